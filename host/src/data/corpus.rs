//! A built-in synthetic multi-domain corpus for the small benchmarks: every federated client
//! gets a different domain, so the clients' data differ measurably (vocabulary, layout,
//! numbers), while each domain is regular enough for a small model to learn.
//!
//! Domains ([`domains`]):
//! - `arithmetic`: word problems with the worked answer (`+ - × ÷` on small integers);
//! - `recipes`: ingredient lists and numbered cooking steps;
//! - `weather`: city weather reports and travel advice;
//! - `code`: short Python functions with docstrings;
//! - `medical`: patient questions and cautious clinical answers.
//!
//! [`generate`] is deterministic in `(domain, n, seed)`: a SplitMix64 stream seeded from the
//! seed and the domain name, drawing templates and words from fixed lists. About half the
//! records are plain text, half Alpaca instruction records.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::rng::{Rng, fnv1a};

use super::formats::{Record, write_jsonl};

const DOMAINS: [&str; 5] = ["arithmetic", "recipes", "weather", "code", "medical"];

/// The names of the built-in domains.
pub fn domains() -> &'static [&'static str] {
    &DOMAINS
}

/// The stream of one domain: the seed mixed with an FNV-1a hash of the domain name.
fn domain_rng(seed: u64, domain: &str) -> Rng {
    Rng::new(seed ^ fnv1a(domain.as_bytes()).rotate_left(17))
}

fn join_list(items: &[&str]) -> String {
    match items {
        [] => String::new(),
        [one] => one.to_string(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}

fn text(text: String, domain: &str) -> Record {
    Record::Text {
        text,
        domain: Some(domain.to_string()),
    }
}

fn alpaca(instruction: String, input: String, output: String, domain: &str) -> Record {
    Record::Alpaca {
        instruction,
        input,
        output,
        domain: Some(domain.to_string()),
    }
}

// ---- arithmetic ------------------------------------------------------------------------------

#[rustfmt::skip]
const NAMES: &[&str] = &[
    "Alice", "Bob", "Carla", "David", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Kira",
    "Liam", "Maya", "Noah", "Olga", "Pedro", "Quinn", "Rosa", "Samir", "Tara", "Umar", "Vera",
    "Wendy", "Xavier", "Yusuf", "Zoe", "Anton", "Bianca", "Chen", "Dana", "Elif", "Felix", "Greta",
    "Hassan", "Ivy", "Jamal", "Keiko", "Lena", "Marco", "Nadia", "Oscar", "Priya", "Rafael",
    "Sofia", "Tomas", "Ursula", "Viktor", "Willa", "Aaron", "Beatrice", "Callum", "Delia", "Ethan",
    "Fatima", "Gabriel", "Hannah", "Isaac", "Julia", "Kevin", "Laura", "Miguel", "Nora", "Owen",
    "Paula", "Ravi", "Sara", "Theo", "Uma", "Valentina", "William", "Yara", "Zach", "Amir",
    "Brigitte", "Carlos", "Dmitri", "Esther", "Frida", "Gustav", "Helena", "Igor", "Jasmine",
    "Kofi", "Leila", "Mateo", "Nina", "Omar", "Patrick", "Rebecca", "Stefan", "Tessa", "Ulrich",
    "Vincent", "Wanda", "Ximena", "Yosef", "Zainab", "Arjun", "Bruno", "Clara", "Diego",
];
#[rustfmt::skip]
const ITEMS: &[&str] = &[
    "apples", "pencils", "marbles", "books", "stickers", "oranges", "cookies", "stamps", "coins",
    "cards", "balloons", "candles", "shells", "buttons", "crayons", "tickets", "eggs", "bottles",
    "flowers", "toys", "bricks", "plates", "cups", "socks", "ribbons", "beads", "nails", "lemons",
    "potatoes", "carrots", "batteries", "envelopes", "notebooks", "peaches", "pebbles", "spoons",
    "bananas", "cherries", "muffins", "puzzles", "kites", "rulers", "erasers", "magnets", "jars",
    "mugs", "towels", "gloves", "hats", "scarves", "blankets", "pillows", "lamps", "chairs",
    "tulips", "roses", "seeds", "acorns", "feathers", "postcards", "comics", "records",
    "bracelets", "keys", "bolts", "screws", "tiles", "planks", "ropes", "baskets", "cakes", "pies",
    "biscuits", "donuts", "pears", "plums", "grapes", "melons", "mangoes",
];
#[rustfmt::skip]
const CONTAINERS: &[&str] = &[
    "boxes", "bags", "baskets", "crates", "jars", "trays", "packs", "bins", "cartons", "sacks",
    "buckets", "drawers", "shelves", "barrels", "envelopes", "folders",
];
#[rustfmt::skip]
const PLACES: &[&str] = &[
    "the market", "the school fair", "the corner shop", "the library sale", "the farm stand",
    "the flea market", "the bakery", "the hardware store", "the garden center", "the post office",
    "the bookshop", "the supermarket", "the toy store", "the harbor stall", "the street fair",
    "the train station kiosk", "the museum shop", "the night market", "the craft fair",
    "the village store",
];

fn pronoun(name: &str) -> &'static str {
    // Alternate by the name's first letter: enough variety for a synthetic corpus.
    if name.as_bytes().first().is_some_and(|b| b % 2 == 0) {
        "She"
    } else {
        "He"
    }
}

fn arithmetic(rng: &mut Rng) -> Record {
    let name = rng.pick(NAMES);
    let other = rng.pick(NAMES);
    let item = rng.pick(ITEMS);
    let place = rng.pick(PLACES);
    let he = pronoun(name);
    let (question, answer) = match rng.int(0, 4) {
        0 => {
            let (a, b) = (rng.int(2, 499), rng.int(2, 499));
            (
                format!(
                    "{name} has {a} {item}. {he} buys {b} more at {place}. How many {item} \
                     does {name} have now?"
                ),
                format!(
                    "{name} starts with {a} {item} and buys {b} more, so {a} + {b} = {}. \
                     {name} has {} {item} now.",
                    a + b,
                    a + b
                ),
            )
        }
        1 => {
            let a = rng.int(10, 500);
            let b = rng.int(1, a - 1);
            (
                format!(
                    "{name} had {a} {item} and gave {b} of them to {other}. How many {item} \
                     are left?"
                ),
                format!(
                    "{name} gave away {b} of {a} {item}, so {a} - {b} = {}. There are {} \
                     {item} left.",
                    a - b,
                    a - b
                ),
            )
        }
        2 => {
            let (n, m) = (rng.int(2, 20), rng.int(2, 40));
            let box_ = rng.pick(CONTAINERS);
            (
                format!(
                    "There are {n} {box_} with {m} {item} in each. How many {item} are there \
                     in total?"
                ),
                format!(
                    "Each of the {n} {box_} holds {m} {item}, so {n} x {m} = {}. There are {} \
                     {item} in total.",
                    n * m,
                    n * m
                ),
            )
        }
        3 => {
            let each = rng.int(2, 60);
            let count = rng.int(2, 15);
            (
                format!(
                    "At {place} one of the {item} costs {each} dollars. {name} buys {count} of \
                     them. How much does {name} pay?"
                ),
                format!(
                    "{count} {item} at {each} dollars each cost {count} x {each} = {} dollars. \
                     {name} pays {} dollars.",
                    count * each,
                    count * each
                ),
            )
        }
        _ => {
            let (k, q) = (rng.int(2, 12), rng.int(2, 40));
            let total = k * q;
            (
                format!(
                    "{name} shares {total} {item} equally among {k} friends. How many {item} \
                     does each friend get?"
                ),
                format!(
                    "{total} {item} shared among {k} friends gives {total} / {k} = {q}. Each \
                     friend gets {q} {item}."
                ),
            )
        }
    };
    if rng.coin() {
        text(
            format!("Problem: {question}\nAnswer: {answer}"),
            "arithmetic",
        )
    } else {
        alpaca(
            "Solve the word problem and explain the calculation.".into(),
            question,
            answer,
            "arithmetic",
        )
    }
}

// ---- recipes ---------------------------------------------------------------------------------

#[rustfmt::skip]
const DISHES: &[&str] = &[
    "tomato soup", "banana bread", "lentil curry", "apple pie", "vegetable stew", "pancakes",
    "mushroom risotto", "chicken salad", "pumpkin soup", "chocolate cake", "garlic bread",
    "bean chili", "potato gratin", "lemon tart", "fried rice", "pasta bake", "onion quiche",
    "carrot cake", "spinach pie", "corn fritters", "beef stew", "fish tacos", "pea risotto",
    "cheese omelette", "berry muffins", "ginger cookies", "noodle soup", "stuffed peppers",
    "baked salmon", "egg fried noodles", "zucchini bread", "rice pudding", "shepherd's pie",
    "couscous salad", "falafel wraps", "minestrone", "tuna casserole", "sweet potato fries",
    "cauliflower curry", "blueberry scones", "cinnamon rolls", "pesto pasta", "tomato bruschetta",
    "lamb kebabs", "vegetable lasagna", "mango chutney", "coconut rice", "black bean burgers",
    "chickpea stew", "roast chicken", "plum crumble", "cherry clafoutis", "leek and potato soup",
    "spiced lentil dal", "polenta cake", "sesame noodles", "miso soup", "paella", "goulash",
    "ratatouille",
];
#[rustfmt::skip]
const ADJECTIVES: &[&str] = &[
    "easy", "quick", "classic", "creamy", "spicy", "rustic", "light", "hearty", "simple", "golden",
    "fresh", "homemade", "crispy", "warm", "smoky", "tangy", "zesty", "savory", "sweet", "fluffy",
    "tender", "juicy", "comforting", "festive", "healthy",
];
#[rustfmt::skip]
const INGREDIENTS: &[&str] = &[
    "flour", "sugar", "butter", "eggs", "milk", "salt", "black pepper", "olive oil", "garlic",
    "onions", "tomatoes", "carrots", "celery", "potatoes", "rice", "lentils", "chickpeas",
    "spinach", "mushrooms", "cheese", "cream", "yogurt", "honey", "lemon juice", "ginger", "cumin",
    "paprika", "cinnamon", "vanilla", "baking powder", "chicken stock", "vegetable stock",
    "parsley", "basil", "thyme", "oregano", "coconut milk", "soy sauce", "brown sugar", "oats",
    "walnuts", "raisins", "bananas", "apples", "almonds", "hazelnuts", "sesame seeds",
    "chili flakes", "coriander", "turmeric", "nutmeg", "cloves", "cardamom", "rosemary", "sage",
    "dill", "mint", "chives", "leeks", "shallots", "zucchini", "eggplant", "bell peppers",
    "sweet corn", "green peas", "kidney beans", "black beans", "quinoa", "couscous", "pasta",
    "noodles", "breadcrumbs", "parmesan", "mozzarella", "feta", "ricotta", "sour cream",
    "maple syrup", "cocoa powder", "dark chocolate", "blueberries", "strawberries", "raspberries",
    "lime juice", "orange zest", "vinegar", "mustard", "tomato paste", "capers", "olives",
];
#[rustfmt::skip]
const UNITS: &[&str] = &[
    "grams of", "cups of", "tablespoons of", "teaspoons of", "pinches of", "handfuls of", "ml of",
    "slices of", "cloves of", "cans of", "ounces of", "sprigs of",
];
#[rustfmt::skip]
const COOK_VERBS: &[&str] = &[
    "Chop", "Stir in", "Whisk", "Fold in", "Add", "Season with", "Sprinkle", "Mix in", "Slice",
    "Melt", "Dice", "Grate", "Mince", "Toast", "Crush", "Drain", "Rinse", "Peel", "Knead", "Blend",
];
#[rustfmt::skip]
const METHODS: &[&str] = &[
    "Bake", "Simmer", "Roast", "Fry", "Boil", "Grill", "Steam", "Braise", "Saute", "Poach",
];

#[rustfmt::skip]
const FINISH: &[&str] = &[
    "until golden brown", "until the sauce thickens", "stirring occasionally", "until tender",
    "until bubbling", "with the lid on", "until crisp at the edges",
    "until a skewer comes out clean", "over a low heat", "until fragrant",
];

fn recipes(rng: &mut Rng) -> Record {
    let dish = rng.pick(DISHES);
    let adj = rng.pick(ADJECTIVES);
    let k = rng.int(3, 6) as usize;
    let ings = rng.distinct(INGREDIENTS, k);
    let lines: Vec<String> = ings
        .iter()
        .map(|i| format!("- {} {} {i}", rng.int(1, 60) * 5, rng.pick(UNITS)))
        .collect();
    let temp = rng.int(14, 22) * 10;
    let minutes = rng.int(2, 12) * 5;
    let method = rng.pick(METHODS);
    let mut steps = vec![format!("1. Preheat the oven to {temp} degrees.")];
    for (n, ing) in ings.iter().take(3).enumerate() {
        steps.push(format!("{}. {} the {ing}.", n + 2, rng.pick(COOK_VERBS)));
    }
    let serve = rng.int(2, 8);
    let finish = rng.pick(FINISH);
    steps.push(format!(
        "{}. {method} for {minutes} minutes {finish} and serve {serve} people.",
        steps.len() + 1
    ));
    let body = format!(
        "Ingredients:\n{}\nSteps:\n{}",
        lines.join("\n"),
        steps.join("\n")
    );
    if rng.coin() {
        text(
            format!("Recipe: {} {dish}\n{body}", capitalize(adj)),
            "recipes",
        )
    } else {
        let input = if rng.coin() {
            format!("Use {}.", join_list(&ings))
        } else {
            String::new()
        };
        alpaca(
            format!("Write a recipe for {adj} {dish}."),
            input,
            body,
            "recipes",
        )
    }
}

// ---- weather ---------------------------------------------------------------------------------

#[rustfmt::skip]
const CITIES: &[&str] = &[
    "Paris", "Berlin", "Madrid", "Rome", "Lisbon", "Vienna", "Prague", "Oslo", "Helsinki",
    "Dublin", "Athens", "Warsaw", "Budapest", "Zurich", "Amsterdam", "Brussels", "Copenhagen",
    "Stockholm", "Tokyo", "Seoul", "Beijing", "Mumbai", "Delhi", "Bangkok", "Jakarta", "Sydney",
    "Melbourne", "Auckland", "Nairobi", "Cairo", "Lagos", "Casablanca", "Toronto", "Montreal",
    "Chicago", "Denver", "Seattle", "Boston", "Miami", "Mexico City", "Lima", "Santiago",
    "Buenos Aires", "Reykjavik", "Edinburgh", "Manchester", "Glasgow", "Lyon", "Marseille",
    "Munich", "Hamburg", "Milan", "Naples", "Seville", "Valencia", "Porto", "Krakow", "Riga",
    "Tallinn", "Vilnius", "Sofia", "Bucharest", "Belgrade", "Zagreb", "Ljubljana", "Istanbul",
    "Ankara", "Tbilisi", "Baku", "Tehran", "Dubai", "Doha", "Riyadh", "Karachi", "Lahore", "Dhaka",
    "Kathmandu", "Colombo", "Hanoi", "Manila", "Singapore", "Kuala Lumpur", "Taipei", "Osaka",
    "Kyoto", "Shanghai", "Hong Kong", "Perth", "Brisbane", "Wellington", "Accra", "Dakar",
    "Addis Ababa", "Kampala", "Johannesburg", "Cape Town", "Havana", "Bogota", "Quito",
    "Montevideo", "Vancouver", "Calgary", "Phoenix", "Atlanta", "Houston", "Anchorage", "Honolulu",
];
#[rustfmt::skip]
const DAYS: &[&str] = &[
    "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday",
];
#[rustfmt::skip]
const MONTHS: &[&str] = &[
    "January", "February", "March", "April", "May", "June", "July", "August", "September",
    "October", "November", "December",
];

#[rustfmt::skip]
const CONDITIONS: &[&str] = &[
    "sunny", "partly cloudy", "overcast", "light rain", "heavy rain", "thunderstorms",
    "snow showers", "fog in the morning", "clear skies", "scattered showers", "drizzle",
    "strong winds", "hail", "freezing rain", "sleet", "mist", "a heatwave", "blowing dust",
    "light snow", "gusty squalls", "humid haze", "a cold front passing",
];
#[rustfmt::skip]
const DIRECTIONS: &[&str] = &[
    "north", "northeast", "east", "southeast", "south", "southwest", "west", "northwest",
];
#[rustfmt::skip]
const ADVICE_WEATHER: &[&str] = &[
    "Bring an umbrella.", "Wear sunscreen.", "Dress in warm layers.", "Roads may be slippery.",
    "Flights could be delayed.", "A good day for a walk in the park.",
    "Museums are a good plan for the afternoon.", "Carry a light jacket.",
    "Stay hydrated in the afternoon heat.", "Expect slow traffic on the highways.",
    "Outdoor markets will be busy.", "Ferries may not run in the evening.",
    "Hiking trails may be muddy.", "Beaches will be crowded by noon.",
    "Cyclists should watch for crosswinds.", "Book indoor restaurants in advance.",
    "Trains may run on a reduced timetable.", "Waterproof boots are a good idea.",
    "Visibility will be poor on mountain roads.", "Consider an early start to avoid the heat.",
];

fn weather(rng: &mut Rng) -> Record {
    let city = rng.pick(CITIES);
    let day = rng.pick(DAYS);
    let cond = rng.pick(CONDITIONS);
    let lo = rng.int(0, 25) as i64 - 10;
    let hi = lo + rng.int(3, 14) as i64;
    let wind = rng.int(1, 12) * 5;
    let dir = rng.pick(DIRECTIONS);
    let rain = rng.int(0, 20) * 5;
    let advice = rng.pick(ADVICE_WEATHER);
    let month = rng.pick(MONTHS);
    let date = rng.int(1, 28);
    let humidity = rng.int(20, 98);
    let pressure = rng.int(985, 1035);
    let sunrise = format!("0{}:{:02}", rng.int(4, 8), rng.int(0, 59));
    let report = format!(
        "{day} {date} {month} in {city}: {cond}, with a high of {hi} and a low of {lo} degrees \
         Celsius. Wind from the {dir} at {wind} km/h, chance of rain {rain} percent, humidity \
         {humidity} percent, pressure {pressure} hPa, sunrise at {sunrise}. {advice}"
    );
    if rng.coin() {
        text(format!("Weather report. {report}"), "weather")
    } else if rng.coin() {
        alpaca(
            format!("What is the weather forecast for {city} on {day}?"),
            String::new(),
            report,
            "weather",
        )
    } else {
        let other = rng.pick(CITIES);
        alpaca(
            "Give travel advice for the trip based on the forecast.".into(),
            format!("Trip from {other} to {city} on {day}. Forecast: {cond}, {hi} degrees."),
            format!(
                "For the trip from {other} to {city} on {day}, expect {cond} and about {hi} \
                 degrees. {advice}"
            ),
            "weather",
        )
    }
}

// ---- code ------------------------------------------------------------------------------------

#[rustfmt::skip]
const CODE_NOUNS: &[&str] = &[
    "list", "numbers", "values", "items", "scores", "prices", "words", "names", "records",
    "matrix", "vector", "counts", "lines", "tokens", "weights", "samples", "grades", "keys",
    "points", "rows", "entries", "ages", "files", "orders", "temperatures", "distances",
    "salaries", "heights", "votes", "ratings", "balances", "readings", "timestamps", "labels",
    "users", "products", "messages", "scores_by_day", "totals", "steps", "pixels", "amounts",
    "durations",
];
#[rustfmt::skip]
const CODE_VARS: &[&str] = &[
    "x", "y", "value", "item", "entry", "element", "n", "v", "score", "price", "word", "row",
    "key", "point", "sample", "reading", "amount", "label", "total_so_far", "current",
];

fn code(rng: &mut Rng) -> Record {
    let noun = rng.pick(CODE_NOUNS);
    let var = rng.pick(CODE_VARS);
    let k = rng.int(2, 9);
    let mut params = noun.to_string();
    let (name, doc, body) = match rng.int(0, 9) {
        0 => (
            format!("sum_{noun}"),
            format!("Return the sum of all {noun}."),
            format!(
                "    total = 0\n    for {var} in {noun}:\n        total += {var}\n    return total"
            ),
        ),
        1 => (
            format!("max_{noun}"),
            format!("Return the largest of the {noun}."),
            format!(
                "    best = {noun}[0]\n    for {var} in {noun}[1:]:\n        if {var} > best:\n            \
                 best = {var}\n    return best"
            ),
        ),
        2 => (
            format!("count_{noun}_above"),
            format!("Count the {noun} greater than {k}."),
            format!("    return sum(1 for {var} in {noun} if {var} > {k})"),
        ),
        3 => (
            format!("scale_{noun}"),
            format!("Multiply every element of {noun} by {k}."),
            format!("    return [{var} * {k} for {var} in {noun}]"),
        ),
        4 => (
            format!("filter_{noun}"),
            format!("Keep the {noun} divisible by {k}."),
            format!(
                "    result = []\n    for {var} in {noun}:\n        if {var} % {k} == 0:\n            \
                 result.append({var})\n    return result"
            ),
        ),
        5 => {
            params = format!("{noun}, target");
            (
                format!("index_of_{noun}"),
                format!("Return the position of the first of the {noun} equal to target."),
                format!(
                    "    for i, {var} in enumerate({noun}):\n        if {var} == target:\n            \
                     return i\n    return -1"
                ),
            )
        }
        6 => (
            format!("clip_{noun}"),
            format!("Limit every element of {noun} to at most {k}."),
            format!("    return [min({var}, {k}) for {var} in {noun}]"),
        ),
        7 => (
            format!("count_each_{noun}"),
            format!("Return a dictionary counting each of the {noun}."),
            format!(
                "    counts = {{}}\n    for {var} in {noun}:\n        counts[{var}] = \
                 counts.get({var}, 0) + 1\n    return counts"
            ),
        ),
        8 => (
            format!("sorted_{noun}"),
            format!("Return the {noun} sorted from largest to smallest."),
            format!("    return sorted({noun}, reverse=True)"),
        ),
        _ => (
            format!("mean_{noun}"),
            format!("Return the average of the {noun}."),
            format!("    if not {noun}:\n        return 0.0\n    return sum({noun}) / len({noun})"),
        ),
    };
    let function = format!("def {name}({params}):\n    \"\"\"{doc}\"\"\"\n{body}\n");
    if rng.coin() {
        text(format!("# Python\n{function}"), "code")
    } else {
        let lower = doc
            .strip_prefix("Return ")
            .map(|d| format!("returns {d}"))
            .unwrap_or_else(|| {
                let mut d = doc.clone();
                if let Some(f) = d.get_mut(0..1) {
                    f.make_ascii_lowercase();
                }
                format!("does this: {d}")
            });
        alpaca(
            format!("Write a Python function called {name} that {lower}"),
            String::new(),
            function,
            "code",
        )
    }
}

// ---- medical ---------------------------------------------------------------------------------

#[rustfmt::skip]
const SYMPTOMS: &[&str] = &[
    "a headache", "a sore throat", "a dry cough", "a runny nose", "a fever", "back pain",
    "stomach pain", "nausea", "dizziness", "fatigue", "a rash", "joint pain", "chest tightness",
    "shortness of breath", "itchy eyes", "ear pain", "a stiff neck", "muscle aches", "heartburn",
    "trouble sleeping", "a swollen ankle", "chills", "blurred vision", "a loss of appetite",
    "leg cramps", "a blocked nose", "night sweats", "a wet cough", "palpitations", "numb fingers",
    "tooth pain", "a burning feeling when urinating", "swollen glands", "a tender knee",
    "wheezing", "hives", "sneezing fits", "a sore shoulder", "lower back stiffness",
    "frequent thirst", "cold hands", "a tingling foot", "hoarse voice", "watery eyes", "bloating",
];
#[rustfmt::skip]
const ILLNESSES: &[&str] = &[
    "the flu", "a common cold", "migraine", "an ear infection", "sinusitis", "bronchitis",
    "food poisoning", "hay fever", "a sprained ankle", "gastritis", "tonsillitis", "dehydration",
    "anemia", "asthma", "eczema", "a urinary tract infection", "tension headache",
    "conjunctivitis", "strep throat", "pneumonia", "a pulled muscle", "tendinitis", "gout",
    "shingles", "chickenpox", "acid reflux", "irritable bowel syndrome", "a kidney stone",
    "vertigo", "plantar fasciitis", "an allergic reaction", "a viral infection", "low blood sugar",
    "high blood pressure", "a thyroid problem",
];
#[rustfmt::skip]
const CARE: &[&str] = &[
    "Rest and drink plenty of fluids.", "Paracetamol can ease the pain and fever.",
    "Use a saline spray for the nose.", "Apply ice for fifteen minutes every few hours.",
    "Avoid spicy food and eat small meals.", "Keep the skin moisturised.",
    "Use a humidifier at night.", "Gargle with warm salt water.",
    "Keep the ankle raised when sitting.", "Avoid screens before bedtime.",
    "Take an antihistamine if the symptoms are mild.", "Stretch gently twice a day.",
    "Sip water slowly through the day.", "Wash your hands often.",
    "Ibuprofen can reduce the swelling.", "Use a warm compress on the sore area.",
    "Avoid alcohol and caffeine for a few days.", "Sleep with your head slightly raised.",
    "Keep a diary of what makes it worse.", "Wear supportive shoes.",
    "Eat plain foods such as rice and toast.", "Use an inhaler as prescribed.",
    "Take regular short walks.", "Apply a cool cloth to the forehead.",
    "Limit salt in your meals.",
];
#[rustfmt::skip]
const WARNINGS: &[&str] = &[
    "See a doctor if the symptoms last more than a week.",
    "Seek urgent care if breathing becomes difficult.",
    "Contact your doctor if the fever rises above 39 degrees.",
    "See a doctor if the pain gets worse.",
    "Get medical help at once if you feel confused or faint.",
    "Ask a pharmacist before combining medicines.", "See a doctor if there is blood in the stool.",
    "Call a doctor if the rash spreads quickly.",
    "Go to the emergency department if the chest pain spreads to the arm.",
    "Book an appointment if it keeps coming back.",
    "Call an ambulance if you cannot keep fluids down.",
    "See an eye doctor if your vision changes suddenly.",
];

#[rustfmt::skip]
const MEDICINES: &[&str] = &[
    "paracetamol", "ibuprofen", "an antihistamine", "a decongestant", "an antacid",
    "oral rehydration salts", "a hydrocortisone cream", "eye drops", "a cough syrup",
    "a nasal spray", "throat lozenges", "a heat patch",
];

fn medical(rng: &mut Rng) -> Record {
    let sym = rng.distinct(SYMPTOMS, 2);
    let ill = rng.pick(ILLNESSES);
    let days = rng.int(1, 14);
    let age = rng.int(18, 85);
    let care = rng.pick(CARE);
    let warn = rng.pick(WARNINGS);
    match rng.int(0, 3) {
        3 => {
            let medicine = rng.pick(MEDICINES);
            alpaca(
                format!("Can I take {medicine} for {}?", sym[0]),
                if rng.coin() {
                    format!("I am {age} years old.")
                } else {
                    String::new()
                },
                format!(
                    "{} can help with {} for most adults. Follow the dose on the package and do \
                     not take it for more than {days} days. {warn}",
                    capitalize(medicine),
                    sym[0]
                ),
                "medical",
            )
        }
        0 => text(
            format!(
                "Patient: I am {age} years old and I have had {} and {} for {days} days. What \
                 should I do?\nDoctor: These symptoms often come with {ill}. {care} {warn}",
                sym[0], sym[1]
            ),
            "medical",
        ),
        1 => {
            let three = rng.distinct(SYMPTOMS, 3);
            alpaca(
                format!("What are common symptoms of {ill}?"),
                String::new(),
                format!(
                    "Common symptoms of {ill} include {}. {care} {warn}",
                    join_list(&three)
                ),
                "medical",
            )
        }
        _ => alpaca(
            "Answer the patient's question as a careful doctor.".into(),
            format!(
                "I have {} and {} since {days} days ago. Is it serious?",
                sym[0], sym[1]
            ),
            format!(
                "{} with {} is usually not serious and often points to {ill}. {care} {warn}",
                capitalize(sym[0]),
                sym[1]
            ),
            "medical",
        ),
    }
}

/// `n` records of `domain` (one of [`domains`]), deterministic in `(domain, n, seed)`: the
/// first `m` records of `generate(d, n, s)` are those of `generate(d, m, s)`.
/// Unknown domains panic; use [`generate_checked`] for user input.
pub fn generate(domain: &str, n: usize, seed: u64) -> Vec<Record> {
    match generate_checked(domain, n, seed) {
        Ok(r) => r,
        Err(e) => panic!("{e}"),
    }
}

/// [`generate`] with an error for an unknown domain.
pub fn generate_checked(domain: &str, n: usize, seed: u64) -> Result<Vec<Record>> {
    let f: fn(&mut Rng) -> Record = match domain {
        "arithmetic" => arithmetic,
        "recipes" => recipes,
        "weather" => weather,
        "code" => code,
        "medical" => medical,
        other => bail!(
            "unknown corpus domain {other:?}; the built-in domains are {}",
            DOMAINS.join(", ")
        ),
    };
    let mut rng = domain_rng(seed, domain);
    Ok((0..n).map(|_| f(&mut rng)).collect())
}

/// Every domain's records, `n_per_domain` each, domain after domain.
pub fn generate_all(n_per_domain: usize, seed: u64) -> Vec<Record> {
    DOMAINS
        .iter()
        .flat_map(|d| generate(d, n_per_domain, seed))
        .collect()
}

/// The texts a record contributes to tokenizer training (prompt and answer rendered as the
/// data templates render them).
pub fn record_texts(r: &Record) -> String {
    match r {
        Record::Text { text, .. } => text.clone(),
        Record::Alpaca {
            instruction,
            input,
            output,
            ..
        } => format!(
            "{}{output}",
            super::formats::alpaca_prompt(instruction, input)
        ),
        Record::ShareGpt { system, turns, .. } => turns
            .iter()
            .enumerate()
            .map(|(k, t)| {
                format!(
                    "{}{}",
                    super::formats::sharegpt_prompt(system.as_deref(), k, &t.user),
                    t.assistant
                )
            })
            .collect(),
    }
}

/// What `fedcdd gen-corpus` writes.
#[derive(Debug, Clone)]
pub struct GenCorpusOptions {
    /// Domains to generate; empty = all.
    pub domains: Vec<String>,
    /// Records per domain.
    pub n: usize,
    pub seed: u64,
    /// A directory that gets `<domain>.jsonl` per domain (with `split`), else one JSONL file.
    pub out: PathBuf,
    /// One file per domain inside `out`.
    pub split: bool,
}

/// Runs `gen-corpus`; returns the files written.
pub fn gen_corpus(args: &GenCorpusOptions) -> Result<Vec<PathBuf>> {
    let domains: Vec<String> = if args.domains.is_empty() {
        DOMAINS.iter().map(|d| d.to_string()).collect()
    } else {
        args.domains.clone()
    };
    if args.n == 0 {
        bail!("--n must be at least 1");
    }
    let mut per_domain = Vec::new();
    for d in &domains {
        per_domain.push((d.clone(), generate_checked(d, args.n, args.seed)?));
    }
    if args.split {
        std::fs::create_dir_all(&args.out)
            .with_context(|| format!("cannot create {}", args.out.display()))?;
        let mut files = Vec::new();
        for (d, records) in &per_domain {
            let path = args.out.join(format!("{d}.jsonl"));
            write_jsonl(&path, records)?;
            files.push(path);
        }
        Ok(files)
    } else {
        let all: Vec<Record> = per_domain.into_iter().flat_map(|(_, r)| r).collect();
        if let Some(parent) = args.out.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        write_jsonl(&args.out, &all)?;
        Ok(vec![args.out.clone()])
    }
}

/// Writes `records` to `path` as JSONL (atomically).
pub fn write_corpus(path: &Path, records: &[Record]) -> Result<()> {
    write_jsonl(path, records)
}
