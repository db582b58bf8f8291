//! Links the parts of `fedcdd-core` an edge aggregator uses into a `#![no_std]` static
//! library with its own panic handler. If anything in the dependency graph pulls in `std`,
//! the build fails with a duplicate `panic_impl` lang item; if anything needs an allocator,
//! it fails for want of a global allocator. Build it with
//! `cargo build -p fedcdd-nostd-check --profile nostd` (panic = "abort").
#![no_std]

use core::panic::PanicInfo;

use fedcdd_core::{FedCddConfig, Layout, StreamingFedCdd, TensorRole, TensorView, Upload};

#[panic_handler]
fn panic(_: &PanicInfo<'_>) -> ! {
    loop {}
}

/// Decodes `upload` and aggregates its first tensor (as the only client) into `out` with
/// streaming FedCDD, reconstructing the masked tensor into `scratch`. Returns 0 on success.
///
/// # Safety
/// Every pointer must be valid for its length (`workspace` for `workspace_len` f32s).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedcdd_edge_aggregate_one(
    upload: *const u8,
    upload_len: usize,
    global: *const f32,
    out: *mut f32,
    scratch: *mut f32,
    workspace: *mut f32,
    len: usize,
    workspace_len: usize,
) -> i32 {
    // SAFETY: the caller guarantees the pointers and lengths.
    let (bytes, global, out, scratch, workspace) = unsafe {
        (
            core::slice::from_raw_parts(upload, upload_len),
            core::slice::from_raw_parts(global, len),
            core::slice::from_raw_parts_mut(out, len),
            core::slice::from_raw_parts_mut(scratch, len),
            core::slice::from_raw_parts_mut(workspace, workspace_len),
        )
    };
    match aggregate_one(bytes, global, out, scratch, workspace) {
        Ok(()) => 0,
        Err(_) => -1,
    }
}

fn aggregate_one(
    bytes: &[u8],
    global: &[f32],
    out: &mut [f32],
    scratch: &mut [f32],
    workspace: &mut [f32],
) -> Result<(), fedcdd_core::Error> {
    let upload = Upload::parse(bytes)?;
    let Some(record) = upload.records().next() else {
        return Err(fedcdd_core::ErrorKind::NoClients.into());
    };
    let record = record?;
    let layout = Layout::new(
        record.layout.rows,
        record.layout.cols,
        TensorRole::from_name(record.name),
    );
    record.reconstruct(scratch)?;
    let cfg = FedCddConfig::default();
    let n = upload.header.num_samples as f32;
    let mut agg = StreamingFedCdd::new(cfg, layout, TensorView::F32(global), workspace)?;
    agg.pass1(upload.header.client_id, n, TensorView::F32(scratch))?;
    agg.pass2(upload.header.client_id, n, TensorView::F32(scratch))?;
    agg.finish(out)?;
    Ok(())
}
