//! Any byte string given to the upload reader returns `Ok` or `Err`, never panics; a valid
//! upload's records reconstruct without panicking.
//!
//! Half the inputs get a correct CRC appended, so the fuzzer explores the structural parser
//! instead of stopping at the checksum. Run: `cargo +nightly fuzz run upload_parse`.
#![no_main]

use fedcdd_core::Upload;
use fedcdd_core::wire::crc32;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, body)) = data.split_first() else { return };
    let mut owned;
    let bytes: &[u8] = if mode & 1 == 0 {
        owned = body.to_vec();
        owned.extend_from_slice(&crc32(body).to_le_bytes());
        &owned
    } else {
        body
    };
    if let Ok(upload) = Upload::parse(bytes) {
        for record in upload.records() {
            let Ok(record) = record else { continue };
            // The declared shape is not bounded by the bytes: stay within a small buffer.
            if record.layout.len() <= 1 << 16 {
                let mut out = vec![0.0f32; record.layout.len()];
                let _ = record.reconstruct(&mut out);
            }
        }
    }
});
