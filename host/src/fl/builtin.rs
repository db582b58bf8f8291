//! The built-in heterogeneous benchmark: four domains that need different skills, each with a
//! training split, a held-out split and an exact-match scorer, plus the prose corpus the
//! built-in base model is pre-trained on.
//!
//! | domain | skill | instruction → response |
//! |---|---|---|
//! | `arithmetic` | sums of two digits (a table of 100 facts) | `What is 7 + 8?` → `7 plus 8 makes 15.` |
//! | `strings` | capitalise 3–5 random letters | `Capitalise the letters: d o g` → `In capitals, d o g is D O G.` |
//! | `facts` | recall from a table of 48 made-up people (city, colour) | `Where does Mirel live?` → `Mirel lives in Oslo.` |
//! | `sorting` | sort 3 digits ascending | `Sort the digits: 7 2 9` → `In order, 7 2 9 becomes 2 7 9.` |
//!
//! The knowledge and the skills are in the pre-training prose: the responses' sentences
//! for random items of every domain, never the instruction template. The instruction data
//! teaches each domain's own question → sentence mapping. Held-out items are disjoint from
//! training items (a hash of the instruction decides its split), so a held-out question is
//! answered only by combining the mapping learned in fine-tuning with what the base learned
//! in pre-training; the base itself, never having seen the template, scores near zero.
//! Scoring is exact match of the whole response sentence.
//!
//! Everything is a pure function of the seed (SplitMix64 streams).

use crate::data::Record;

/// The benchmark's domains, in report order.
pub const DOMAINS: [&str; 4] = ["arithmetic", "strings", "facts", "sorting"];

/// One in `HELD_OUT_EVERY` items is held out.
const HELD_OUT_EVERY: u64 = 5;

const NAMES: [&str; 48] = [
    "Mirel", "Tovan", "Kessa", "Brin", "Olvar", "Dena", "Pavo", "Yuri", "Selka", "Harn", "Ilse",
    "Quen", "Rodo", "Fenna", "Garo", "Lumi", "Nesko", "Tilda", "Varn", "Zora", "Ambo", "Cela",
    "Dorin", "Eska", "Falk", "Greta", "Hobb", "Inka", "Jorn", "Kalla", "Lenz", "Moro", "Nala",
    "Orri", "Pelle", "Runa", "Sigo", "Tarek", "Ulla", "Vesta", "Wren", "Xami", "Yola", "Zeno",
    "Aldo", "Bela", "Corin", "Dagny",
];
const CITIES: [&str; 12] = [
    "Oslo", "Lima", "Cairo", "Paris", "Tokyo", "Quito", "Rome", "Dakar", "Hanoi", "Bern",
    "Perth", "Riga",
];
const COLOURS: [&str; 8] = [
    "red", "blue", "green", "yellow", "purple", "orange", "black", "white",
];
const LETTERS: &[u8] = b"abcdefghijklmnopqrstuvwxyz";

/// SplitMix64 (Steele, Lea, Flood 2014).
struct Rng(u64);

impl Rng {
    fn new(seed: u64, stream: &str) -> Self {
        Rng(seed ^ fnv(stream.as_bytes()).rotate_left(23))
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0)
    }

    /// Uniform in `0..n`.
    fn below(&mut self, n: usize) -> usize {
        (((self.next() >> 32) * n as u64) >> 32) as usize
    }
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn fnv(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Which split an item (its instruction) belongs to, for a benchmark seed.
fn is_held_out(seed: u64, instruction: &str) -> bool {
    mix(fnv(instruction.as_bytes()) ^ seed.wrapping_mul(0xD2B7_4407_B1CE_6E93))
        .is_multiple_of(HELD_OUT_EVERY)
}

/// The train or held-out split.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    HeldOut,
}

/// One question with its exact answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Item {
    pub domain: &'static str,
    pub instruction: String,
    pub answer: String,
}

impl Item {
    pub fn to_record(&self) -> Record {
        Record::Alpaca {
            instruction: self.instruction.clone(),
            input: String::new(),
            output: self.answer.clone(),
            domain: Some(self.domain.to_string()),
        }
    }
}

/// City and colour of person `i` of the facts table (a pure function of the seed).
fn person_facts(seed: u64, i: usize) -> (&'static str, &'static str) {
    let h = mix(seed ^ 0xFAC7 ^ (i as u64).wrapping_mul(0x9E37_79B9));
    (
        CITIES[(h % CITIES.len() as u64) as usize],
        COLOURS[((h >> 32) % COLOURS.len() as u64) as usize],
    )
}

fn spaced(chars: &[u8]) -> String {
    let mut s = String::with_capacity(chars.len() * 2);
    for (i, &c) in chars.iter().enumerate() {
        if i > 0 {
            s.push(' ');
        }
        s.push(c as char);
    }
    s
}

/// A random item of `domain` (any split), with the raw material the prose needs.
fn random_item(domain: &'static str, rng: &mut Rng, seed: u64) -> Item {
    match domain {
        "arithmetic" => {
            let (a, b) = (rng.below(10), rng.below(10));
            Item {
                domain,
                instruction: format!("What is {a} + {b}?"),
                answer: (a + b).to_string(),
            }
        }
        "strings" => {
            let n = 3 + rng.below(3);
            let w: Vec<u8> = (0..n).map(|_| LETTERS[rng.below(LETTERS.len())]).collect();
            let r: Vec<u8> = w.iter().map(u8::to_ascii_uppercase).collect();
            Item {
                domain,
                instruction: format!("Capitalise the letters: {}", spaced(&w)),
                answer: spaced(&r),
            }
        }
        "facts" => {
            let i = rng.below(NAMES.len());
            let (city, colour) = person_facts(seed, i);
            if rng.next() & 1 == 0 {
                Item {
                    domain,
                    instruction: format!("Where does {} live?", NAMES[i]),
                    answer: city.to_string(),
                }
            } else {
                Item {
                    domain,
                    instruction: format!("What is the favourite colour of {}?", NAMES[i]),
                    answer: colour.to_string(),
                }
            }
        }
        _ => {
            let d: Vec<u8> = (0..3).map(|_| b'0' + rng.below(10) as u8).collect();
            let mut s = d.clone();
            s.sort_unstable();
            Item {
                domain,
                instruction: format!("Sort the digits: {}", spaced(&d)),
                answer: spaced(&s),
            }
        }
    }
}

/// The canonical `&'static` name of a built-in domain.
pub fn domain_name(domain: &str) -> Option<&'static str> {
    DOMAINS.iter().copied().find(|d| *d == domain)
}

/// `n` items of `domain` from `split`, deterministic in `(domain, split, n, seed)`.
/// Items may repeat (the table domains have few distinct items).
pub fn items(domain: &str, split: Split, n: usize, seed: u64) -> Vec<Item> {
    let Some(domain) = domain_name(domain) else {
        return Vec::new();
    };
    let stream = format!("{domain}/{split:?}");
    let mut rng = Rng::new(seed, &stream);
    let mut out = Vec::with_capacity(n);
    // Each split holds about 1/5 or 4/5 of the items: rejection terminates quickly.
    while out.len() < n {
        let it = random_item(domain, &mut rng, seed);
        if is_held_out(seed, &it.instruction) == (split == Split::HeldOut) {
            let answer = prose(&it);
            out.push(Item { answer, ..it });
        }
    }
    out
}

/// Distinct held-out items of `domain`, up to `n` (the table domains have fewer).
pub fn held_out_distinct(domain: &str, n: usize, seed: u64) -> Vec<Item> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for it in items(domain, Split::HeldOut, n * 20, seed) {
        if out.len() == n {
            break;
        }
        if seen.insert(it.instruction.clone()) {
            out.push(it);
        }
    }
    out
}

/// Exact match after trimming surrounding whitespace and one trailing full stop.
pub fn exact_match(generated: &str, answer: &str) -> bool {
    let norm = |s: &str| {
        let s = s.trim();
        s.strip_suffix('.').unwrap_or(s).trim().to_string()
    };
    norm(generated) == norm(answer)
}

/// The sentence form of an item: what the pre-training prose says about it.
fn prose(it: &Item) -> String {
    match it.domain {
        "arithmetic" => {
            let q = it
                .instruction
                .trim_start_matches("What is ")
                .trim_end_matches('?');
            let q = q.replace(" + ", " plus ");
            format!("{q} makes {}.", it.answer)
        }
        "strings" => {
            let w = it.instruction.trim_start_matches("Capitalise the letters: ");
            format!("In capitals, {w} is {}.", it.answer)
        }
        "facts" => {
            if let Some(name) = it
                .instruction
                .strip_prefix("Where does ")
                .and_then(|r| r.strip_suffix(" live?"))
            {
                format!("{name} lives in {}.", it.answer)
            } else {
                let name = it
                    .instruction
                    .trim_start_matches("What is the favourite colour of ")
                    .trim_end_matches('?');
                format!("{name} likes the colour {}.", it.answer)
            }
        }
        _ => {
            let d = it.instruction.trim_start_matches("Sort the digits: ");
            format!("In order, {d} becomes {}.", it.answer)
        }
    }
}

/// The pre-training question about an item: worded differently from the benchmark's
/// instruction, so the base learns to answer questions but not the benchmark's.
fn prose_question(it: &Item) -> String {
    match it.domain {
        "arithmetic" => {
            let q = it.instruction.trim_start_matches("What is ").trim_end_matches('?');
            format!("How much is {}?", q.replace(" + ", " plus "))
        }
        "strings" => format!(
            "Write {} in capitals.",
            it.instruction.trim_start_matches("Capitalise the letters: ")
        ),
        "facts" => match it
            .instruction
            .strip_prefix("Where does ")
            .and_then(|r| r.strip_suffix(" live?"))
        {
            Some(name) => format!("Which city is home to {name}?"),
            None => format!(
                "Which colour does {} like?",
                it.instruction
                    .trim_start_matches("What is the favourite colour of ")
                    .trim_end_matches('?')
            ),
        },
        _ => format!(
            "Put {} in order.",
            it.instruction.trim_start_matches("Sort the digits: ")
        ),
    }
}

/// `n` lines of pre-training prose, each a few sentences from random domains (both splits:
/// the base model knows every fact), half of them as `Q: … A: …` pairs with other wording
/// than the benchmark's instructions.
pub fn pretrain_texts(n: usize, sentences_per_line: usize, seed: u64) -> Vec<String> {
    let mut rng = Rng::new(seed, "prose");
    (0..n)
        .map(|_| {
            (0..sentences_per_line)
                .map(|_| {
                    let d = DOMAINS[rng.below(DOMAINS.len())];
                    let it = random_item(d, &mut rng, seed);
                    if rng.next() & 1 == 0 {
                        prose(&it)
                    } else {
                        format!("Q: {} A: {}", prose_question(&it), prose(&it))
                    }
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
        for (i, name) in NAMES.iter().enumerate() {
            let (city, colour) = person_facts(seed, i);
            texts.push(crate::data::alpaca_prompt(
                &format!("Where does {name} live?"),
                "",
            ));
            texts.push(format!(
                "{}{city}",
                crate::data::alpaca_prompt(
                    &format!("What is the favourite colour of {name}?"),
                    ""
                )
            ));
            texts.push(format!(
                "{name} lives in {city}. {name} likes the colour {colour}."
            ));
        }
        for c in CITIES.iter().chain(COLOURS.iter()) {
            texts.push(format!(" {c} {c}."));
        }
        for t in [
            "What is the sum? plus makes",
            "Capitalise the letters: In capitals, is",
            "Q: How much is? A: Write in capitals. Which city is home to? Which colour does like? Put in order.",
            "Sort the digits: In order, becomes",
        ] {
            texts.push(crate::data::alpaca_prompt(t, ""));
            texts.push(t.to_string());
        }
    }
    texts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_are_disjoint_and_deterministic() {
        for d in DOMAINS {
            let train = items(d, Split::Train, 400, 7);
            let held = items(d, Split::HeldOut, 100, 7);
            assert_eq!(train, items(d, Split::Train, 400, 7));
            let train_q: std::collections::HashSet<_> =
                train.iter().map(|i| &i.instruction).collect();
            assert!(held.iter().all(|h| !train_q.contains(&h.instruction)), "{d}");
            assert!(!held.is_empty());
        }
    }

    /// The last word group of a response sentence: what comes after its final verb.
    fn tail(answer: &str, verb: &str) -> String {
        let (_, t) = answer.rsplit_once(verb).unwrap();
        t.trim_end_matches('.').to_string()
    }

    #[test]
    fn answers_are_right() {
        for it in items("arithmetic", Split::Train, 50, 1) {
            let q = it.instruction.trim_start_matches("What is ").trim_end_matches('?');
            let (a, b) = q.split_once(" + ").unwrap();
            let sum: u32 = a.parse::<u32>().unwrap() + b.parse::<u32>().unwrap();
            assert_eq!(it.answer, format!("{a} plus {b} makes {sum}."));
        }
        for it in items("sorting", Split::HeldOut, 50, 1) {
            let mut d: Vec<&str> = it
                .instruction
                .trim_start_matches("Sort the digits: ")
                .split(' ')
                .collect();
            d.sort();
            assert_eq!(tail(&it.answer, " becomes "), d.join(" "));
        }
        for it in items("strings", Split::Train, 50, 1) {
            let w = it.instruction.trim_start_matches("Capitalise the letters: ");
            assert_eq!(tail(&it.answer, " is "), w.to_uppercase());
        }
        for it in items("facts", Split::Train, 50, 1) {
            let name = NAMES.iter().position(|n| it.instruction.contains(n)).unwrap();
            let (city, colour) = person_facts(1, name);
            assert!(it.answer.ends_with(&format!(" {city}.")) || it.answer.ends_with(&format!(" {colour}.")));
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

    #[test]
    fn scorer() {
        assert!(exact_match(" 19.\n", "19"));
        assert!(!exact_match("190", "19"));
        assert!(exact_match("D O G", "D O G"));
        assert!(!exact_match("DOG", "D O G"));
    }
}
