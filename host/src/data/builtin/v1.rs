//! Benchmark `v1` (the first built-in benchmark, kept for reproducibility): four domains that
//! need different skills, each with a training split, a held-out split and an exact-match
//! scorer, plus the prose corpus its base model is pre-trained on. Its table domains are small:
//! about 20 distinct held-out arithmetic questions and 48 facts questions.
//!
//! | domain | skill | instruction → response |
//! |---|---|---|
//! | `arithmetic` | sums of two digits (a table of 100 facts) | `How much is 7 plus 8?` → `7 plus 8 makes 15.` |
//! | `strings` | capitalise 3 random letters | `Write d o g in capitals.` → `In capitals, d o g is D O G.` |
//! | `facts` | recall from a table of 24 made-up people (city, colour) | `Which city is home to Mirel?` → `Mirel lives in Oslo.`; held out: `Where does Mirel live?` |
//! | `sorting` | sort 3 digits ascending | `Put 7 2 9 in order.` → `In order, 7 2 9 becomes 2 7 9.` |
//!
//! The base model is pre-trained on question/answer prose for random items of every domain
//! (every fact of the table, random letters and digits), each in one of four formats
//! (`Q: … A: …`, `User: … Assistant: …`, ...), never inside the Alpaca instruction
//! template. Instruction tuning teaches the model to answer inside the template; each
//! client sees one domain's questions only. Held-out items are disjoint from training items:
//! a hash of the instruction decides the split of arithmetic, strings and sorting; the facts
//! table is fixed, so its held-out questions ask about the same facts in other words. The
//! base itself, never having seen the template, scores near zero.
//! Scoring is exact match of the whole response sentence.
//!
//! Everything is a pure function of the seed (SplitMix64 streams).

use crate::rng::{Rng, mix};

use super::{Item, Split, WRAPPERS, is_held_out, spaced, stream};

/// The benchmark's domains, in report order.
pub const DOMAINS: [&str; 4] = ["arithmetic", "strings", "facts", "sorting"];

const NAMES: [&str; 48] = [
    "Mirel", "Tovan", "Kessa", "Brin", "Olvar", "Dena", "Pavo", "Yuri", "Selka", "Harn", "Ilse",
    "Quen", "Rodo", "Fenna", "Garo", "Lumi", "Nesko", "Tilda", "Varn", "Zora", "Ambo", "Cela",
    "Dorin", "Eska", "Falk", "Greta", "Hobb", "Inka", "Jorn", "Kalla", "Lenz", "Moro", "Nala",
    "Orri", "Pelle", "Runa", "Sigo", "Tarek", "Ulla", "Vesta", "Wren", "Xami", "Yola", "Zeno",
    "Aldo", "Bela", "Corin", "Dagny",
];
/// People of the facts table (the first of [`NAMES`]).
const PEOPLE: usize = 24;
const CITIES: [&str; 12] = [
    "Oslo", "Lima", "Cairo", "Paris", "Tokyo", "Quito", "Rome", "Dakar", "Hanoi", "Bern", "Perth",
    "Riga",
];
const COLOURS: [&str; 8] = [
    "red", "blue", "green", "yellow", "purple", "orange", "black", "white",
];
const LETTERS: &[u8] = b"abcdefghijklmnopqrstuvwxyz";

/// City and colour of person `i` of the facts table (a pure function of the seed).
fn person_facts(seed: u64, i: usize) -> (&'static str, &'static str) {
    let h = mix(seed ^ 0xFAC7 ^ (i as u64).wrapping_mul(0x9E37_79B9));
    (
        CITIES[(h % CITIES.len() as u64) as usize],
        COLOURS[((h >> 32) % COLOURS.len() as u64) as usize],
    )
}

/// How a facts question is worded: training and held-out questions use different wordings
/// of the same table; the pre-training prose uses both.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Wording {
    Train,
    HeldOut,
    Either,
}

/// A random item of `domain`; the answer is the whole response sentence.
fn random_item(domain: &'static str, rng: &mut Rng, seed: u64, wording: Wording) -> Item {
    let item = |instruction: String, answer: String| Item {
        domain,
        instruction,
        answer,
    };
    match domain {
        "arithmetic" => {
            let (a, b) = (rng.below(10), rng.below(10));
            item(
                format!("How much is {a} plus {b}?"),
                format!("{a} plus {b} makes {}.", a + b),
            )
        }
        "strings" => {
            let w: Vec<u8> = (0..3).map(|_| LETTERS[rng.below(LETTERS.len())]).collect();
            let up: Vec<u8> = w.iter().map(u8::to_ascii_uppercase).collect();
            let (w, up) = (spaced(&w), spaced(&up));
            item(
                format!("Write {w} in capitals."),
                format!("In capitals, {w} is {up}."),
            )
        }
        "facts" => {
            let i = rng.below(PEOPLE);
            let name = NAMES[i];
            let (city, colour) = person_facts(seed, i);
            let held_out = match wording {
                Wording::Train => false,
                Wording::HeldOut => true,
                Wording::Either => rng.next_u64() & 1 == 1,
            };
            if rng.next_u64() & 1 == 0 {
                let q = if held_out {
                    format!("Where does {name} live?")
                } else {
                    format!("Which city is home to {name}?")
                };
                item(q, format!("{name} lives in {city}."))
            } else {
                let q = if held_out {
                    format!("What is the favourite colour of {name}?")
                } else {
                    format!("Which colour does {name} like?")
                };
                item(q, format!("{name} likes the colour {colour}."))
            }
        }
        _ => {
            let d: Vec<u8> = (0..3).map(|_| b'0' + rng.below(10) as u8).collect();
            let mut sorted = d.clone();
            sorted.sort_unstable();
            let (d, sorted) = (spaced(&d), spaced(&sorted));
            item(
                format!("Put {d} in order."),
                format!("In order, {d} becomes {sorted}."),
            )
        }
    }
}

/// Domains of the pre-training sentences, drawn uniformly from this list.
const PRETRAIN_MIX: [&str; 5] = ["arithmetic", "strings", "facts", "facts", "sorting"];

/// `n` items of `domain` from `split`, deterministic in `(domain, split, n, seed)`.
/// Items may repeat (the table domains have few distinct items).
pub fn items(domain: &str, split: Split, n: usize, seed: u64) -> Vec<Item> {
    let Some(domain) = DOMAINS.iter().copied().find(|d| *d == domain) else {
        return Vec::new();
    };
    let stream_name = format!("{domain}/{split:?}");
    let mut rng = stream(seed, &stream_name);
    let mut out = Vec::with_capacity(n);
    // Each split holds about 1/5 or 4/5 of the items: rejection terminates quickly.
    let held_out = split == Split::HeldOut;
    while out.len() < n {
        if domain == "facts" {
            // The table is fixed: held-out questions ask about the same facts in other words.
            let wording = if held_out {
                Wording::HeldOut
            } else {
                Wording::Train
            };
            out.push(random_item(domain, &mut rng, seed, wording));
            continue;
        }
        let it = random_item(domain, &mut rng, seed, Wording::Either);
        if is_held_out(seed, &it.instruction) == held_out {
            out.push(it);
        }
    }
    out
}

/// `n` lines of pre-training prose, each a few sentences from random domains (both splits:
/// the base model knows every fact) as question/answer pairs in the [`WRAPPERS`] formats:
/// the base answers the benchmark's questions there, but not inside the Alpaca template.
pub fn pretrain_texts(n: usize, sentences_per_line: usize, seed: u64) -> Vec<String> {
    let mut rng = stream(seed, "prose");
    (0..n)
        .map(|_| {
            (0..sentences_per_line)
                .map(|_| {
                    // Facts are memorised, so they get two shares of the prose.
                    let d = PRETRAIN_MIX[rng.below(PRETRAIN_MIX.len())];
                    let it = random_item(d, &mut rng, seed, Wording::Either);
                    let (q, a) = WRAPPERS[rng.below(WRAPPERS.len())];
                    format!("{q}{} {a}{}", it.instruction, it.answer)
                })
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

/// Texts the benchmark tokenizer's merges are learned from: the Alpaca template and the
/// fixed words (names, cities, colours, the questions' wording), never digits or random
/// letters, so those stay one token per character.
pub fn tokenizer_texts() -> Vec<String> {
    let mut texts = Vec::new();
    let seed = 0;
    for _ in 0..3 {
        for (i, name) in NAMES.iter().take(PEOPLE).enumerate() {
            let (city, colour) = person_facts(seed, i);
            texts.push(crate::data::formats::alpaca_prompt(
                &format!("Which city is home to {name}?"),
                "",
            ));
            texts.push(format!(
                "{}{city}",
                crate::data::formats::alpaca_prompt(&format!("Which colour does {name} like?"), "")
            ));
            texts.push(format!(
                "{name} lives in {city}. {name} likes the colour {colour}. Where does {name} \
                 live? What is the favourite colour of {name}?"
            ));
        }
        for c in CITIES.iter().chain(COLOURS.iter()) {
            texts.push(format!(" {c} {c}."));
        }
        for t in [
            "How much is plus? makes",
            "Write in capitals. In capitals, is",
            "Q: How much is? A: Which city is home to? Which colour does like?",
            "Question: Answer: User: Assistant: Input: Output:",
            "Put in order. In order, becomes",
        ] {
            texts.push(crate::data::formats::alpaca_prompt(t, ""));
            texts.push(t.to_string());
        }
    }
    texts
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The last word group of a response sentence: what comes after its final verb.
    fn tail(answer: &str, verb: &str) -> String {
        let (_, t) = answer.rsplit_once(verb).unwrap();
        t.trim_end_matches('.').to_string()
    }

    #[test]
    fn answers_are_right() {
        for it in items("arithmetic", Split::Train, 50, 1) {
            let q = it
                .instruction
                .trim_start_matches("How much is ")
                .trim_end_matches('?');
            let (a, b) = q.split_once(" plus ").unwrap();
            let sum: u32 = a.parse::<u32>().unwrap() + b.parse::<u32>().unwrap();
            assert_eq!(it.answer, format!("{a} plus {b} makes {sum}."));
        }
        for it in items("sorting", Split::HeldOut, 50, 1) {
            let mut d: Vec<&str> = it
                .instruction
                .trim_start_matches("Put ")
                .trim_end_matches(" in order.")
                .split(' ')
                .collect();
            d.sort();
            assert_eq!(tail(&it.answer, " becomes "), d.join(" "));
        }
        for it in items("strings", Split::Train, 50, 1) {
            let w = it
                .instruction
                .trim_start_matches("Write ")
                .trim_end_matches(" in capitals.");
            assert_eq!(tail(&it.answer, " is "), w.to_uppercase());
        }
        for it in items("facts", Split::Train, 50, 1) {
            let name = NAMES
                .iter()
                .position(|n| it.instruction.contains(n))
                .unwrap();
            let (city, colour) = person_facts(1, name);
            assert!(
                it.answer.ends_with(&format!(" {city}."))
                    || it.answer.ends_with(&format!(" {colour}."))
            );
        }
    }

    #[test]
    fn prose_states_the_same_facts() {
        let texts = pretrain_texts(200, 4, 3);
        // Every fact sentence in the prose agrees with the table of the same seed.
        for line in &texts {
            for (i, name) in NAMES.iter().enumerate() {
                let (city, _) = person_facts(3, i);
                let needle = format!("{name} lives in ");
                if let Some(p) = line.find(&needle) {
                    assert!(line[p + needle.len()..].starts_with(city), "{line}");
                }
            }
        }
    }
}
