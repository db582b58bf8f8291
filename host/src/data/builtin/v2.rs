//! Benchmark `v2` (default): four domains that ask the same kind of question — apply a named
//! rule to a string of four digits — and need different answers.
//!
//! | domain | rule | instruction → response |
//! |---|---|---|
//! | `sort` | ascending order | `Apply rule K to 3 8 1 5.` → `1 3 5 8` |
//! | `reverse` | reverse order | `Apply rule P to 3 8 1 5.` → `5 1 8 3` |
//! | `shift` | every digit plus one (9 → 0) | `Apply rule T to 3 8 1 5.` → `4 9 2 6` |
//! | `rotate` | first digit moved to the end | `Apply rule W to 3 8 1 5.` → `8 1 5 3` |
//!
//! The base model is pre-trained on prose that states each operation in words (`Q: What is
//! 3 8 1 5 sorted? A: 1 3 5 8`) for random digit strings, never the rule letters and never the
//! Alpaca template: it can do every operation but does not know which letter names which,
//! so it scores near zero in the template. Instruction tuning has to learn "rule K means
//! sort" from the examples. A client that holds one domain sees one rule only, so its update
//! learns "in the template, answer with my operation" — the four domains' updates conflict,
//! and pooled (centralized) training, which sees all four letters, is the ceiling that
//! heterogeneity is measured against.
//!
//! A digit string is held out (for every rule at once) by a hash of the string: 2 000 of the
//! 10 000 strings, so each domain has that many distinct held-out questions. Scoring is exact
//! match of the answer digits.

use super::{Item, Split, WRAPPERS, is_held_out, spaced, stream};

/// The benchmark's domains, in report order.
pub const DOMAINS: [&str; 4] = ["sort", "reverse", "shift", "rotate"];

/// The letter the instruction names each domain's rule by.
const RULES: [&str; 4] = ["K", "P", "T", "W"];

/// Digits per question.
const LEN: usize = 4;

/// The result of `domain`'s operation on `digits` (ASCII digits).
fn apply(domain: &str, digits: &[u8]) -> Vec<u8> {
    let mut out = digits.to_vec();
    match domain {
        "sort" => out.sort_unstable(),
        "reverse" => out.reverse(),
        "shift" => out
            .iter_mut()
            .for_each(|d| *d = b'0' + (*d - b'0' + 1) % 10),
        _ => out.rotate_left(1),
    }
    out
}

/// How the pre-training prose asks for `domain`'s operation on `digits` (words, no letter).
fn prose_question(domain: &str, digits: &str) -> String {
    match domain {
        "sort" => format!("What is {digits} sorted?"),
        "reverse" => format!("What is {digits} reversed?"),
        "shift" => format!("What is {digits} with every digit plus one?"),
        _ => format!("What is {digits} rotated by one?"),
    }
}

fn random_digits(rng: &mut crate::rng::Rng) -> Vec<u8> {
    (0..LEN).map(|_| b'0' + rng.below(10) as u8).collect()
}

fn item(domain: &'static str, digits: &[u8]) -> Item {
    let rule = DOMAINS
        .iter()
        .position(|d| *d == domain)
        .map_or("?", |i| RULES[i]);
    Item {
        domain,
        instruction: format!("Apply rule {rule} to {}.", spaced(digits)),
        answer: spaced(&apply(domain, digits)),
    }
}

/// `n` items of `domain` from `split` (digit strings may repeat).
pub fn items(domain: &str, split: Split, n: usize, seed: u64) -> Vec<Item> {
    let Some(domain) = DOMAINS.iter().copied().find(|d| *d == domain) else {
        return Vec::new();
    };
    let mut rng = stream(seed, &format!("v2/{domain}/{split:?}"));
    let held_out = split == Split::HeldOut;
    let mut out = Vec::with_capacity(n);
    // A fifth of the strings are held out: rejection terminates quickly.
    while out.len() < n {
        let d = random_digits(&mut rng);
        if is_held_out(seed, &spaced(&d)) == held_out {
            out.push(item(domain, &d));
        }
    }
    out
}

/// `n` lines of pre-training prose: random operations on random digit strings (both splits),
/// asked in words in the [`WRAPPERS`] formats.
pub fn pretrain_texts(n: usize, sentences_per_line: usize, seed: u64) -> Vec<String> {
    let mut rng = stream(seed, "v2/prose");
    (0..n)
        .map(|_| {
            (0..sentences_per_line)
                .map(|_| {
                    let domain = DOMAINS[rng.below(DOMAINS.len())];
                    let d = random_digits(&mut rng);
                    let (q, a) = WRAPPERS[rng.below(WRAPPERS.len())];
                    format!(
                        "{q}{} {a}{}",
                        prose_question(domain, &spaced(&d)),
                        spaced(&apply(domain, &d))
                    )
                })
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

/// Texts the tokenizer's merges are learned from: the template, the rule wording and the
/// prose wording, never digits.
pub fn tokenizer_texts() -> Vec<String> {
    let mut texts = Vec::new();
    for _ in 0..3 {
        for (d, rule) in DOMAINS.iter().zip(RULES) {
            texts.push(crate::data::formats::alpaca_prompt(
                &format!("Apply rule {rule} to ."),
                "",
            ));
            for (q, a) in WRAPPERS {
                texts.push(format!("{q}{} {a}", prose_question(d, "")));
            }
        }
    }
    texts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digits_of(instruction: &str) -> Vec<u8> {
        instruction
            .bytes()
            .filter(u8::is_ascii_digit)
            .collect::<Vec<u8>>()
    }

    #[test]
    fn answers_are_right() {
        for it in items("sort", Split::Train, 30, 1) {
            let mut d = digits_of(&it.instruction);
            d.sort();
            assert_eq!(it.answer, spaced(&d));
            assert!(it.instruction.starts_with("Apply rule K to "));
        }
        for it in items("reverse", Split::HeldOut, 30, 1) {
            let d: Vec<u8> = digits_of(&it.instruction).into_iter().rev().collect();
            assert_eq!(it.answer, spaced(&d));
        }
        let shift = item("shift", b"3919");
        assert_eq!(shift.answer, "4 0 2 0");
        assert_eq!(shift.instruction, "Apply rule T to 3 9 1 9.");
        assert_eq!(item("rotate", b"3815").answer, "8 1 5 3");
    }

    /// A held-out digit string is held out for every rule.
    #[test]
    fn held_out_strings_are_shared_by_every_rule() {
        let train: std::collections::HashSet<Vec<u8>> = DOMAINS
            .iter()
            .flat_map(|d| items(d, Split::Train, 2000, 4))
            .map(|it| digits_of(&it.instruction))
            .collect();
        for d in DOMAINS {
            for it in items(d, Split::HeldOut, 200, 4) {
                assert!(!train.contains(&digits_of(&it.instruction)), "{d}");
            }
        }
    }

    #[test]
    fn prose_never_names_a_rule() {
        for line in pretrain_texts(300, 2, 5) {
            assert!(!line.contains("rule") && !line.contains("###"), "{line}");
        }
    }
}
