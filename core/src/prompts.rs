//! medvlsm's non-radiology prompt templates P0–P6 (reference §3, R-OLD
//! `scripts/get_prompts_csv.py`), built from a class name and optional attributes.
//! An attribute left empty is left out of the template, with single spaces kept.

use serde::{Deserialize, Serialize};

/// The attributes the templates use. `number` is a count written in words ("two").
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PromptAttributes {
    pub class: String,
    pub shape: String,
    pub color: String,
    pub size: String,
    pub number: String,
    pub location: String,
}

/// The prompt ids the templates build (P7–P9 need hand-written descriptions).
pub const TEMPLATE_IDS: [u8; 7] = [0, 1, 2, 3, 4, 5, 6];

impl PromptAttributes {
    /// The prompt for id `p` (0–6), or `None` for other ids.
    ///
    /// p0 "" · p1 `{class}` · p2 `{shape} {class}` · p3 `{color} {shape} {class}` ·
    /// p4 `{size} {color} {shape} {class}` · p5 `{number} {size} {color} {shape} {class}` ·
    /// p6 p5 + `, located in {location} of the image`.
    pub fn prompt(&self, p: u8) -> Option<String> {
        let words: &[&str] = match p {
            0 => return Some(String::new()),
            1 => &[&self.class],
            2 => &[&self.shape, &self.class],
            3 => &[&self.color, &self.shape, &self.class],
            4 => &[&self.size, &self.color, &self.shape, &self.class],
            5 | 6 => &[
                &self.number,
                &self.size,
                &self.color,
                &self.shape,
                &self.class,
            ],
            _ => return None,
        };
        let mut text = join_words(words);
        let location = self.location.trim();
        if p == 6 && !location.is_empty() {
            text.push_str(&format!(", located in {location} of the image"));
        }
        Some(text)
    }

    /// P1–P6, as the page's preset fills them in.
    pub fn presets(&self) -> Vec<String> {
        (1..=6).filter_map(|p| self.prompt(p)).collect()
    }
}

fn join_words(words: &[&str]) -> String {
    words
        .iter()
        .map(|w| w.trim())
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// A file-name-safe short form of a prompt: lowercase alphanumerics joined by `-`, at most
/// 48 characters, "empty" for an empty prompt.
pub fn slug(prompt: &str) -> String {
    let s: String = prompt
        .chars()
        .map(|c| {
            if c.is_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let s: Vec<&str> = s.split('-').filter(|p| !p.is_empty()).collect();
    let s: String = s.join("-").chars().take(48).collect();
    if s.is_empty() { "empty".into() } else { s }
}

/// A count in English words, as Python's `num2words` writes it ("twenty-one",
/// "one hundred and five"), for 0–999 999.
pub fn number_words(n: u32) -> String {
    const ONES: [&str; 20] = [
        "zero",
        "one",
        "two",
        "three",
        "four",
        "five",
        "six",
        "seven",
        "eight",
        "nine",
        "ten",
        "eleven",
        "twelve",
        "thirteen",
        "fourteen",
        "fifteen",
        "sixteen",
        "seventeen",
        "eighteen",
        "nineteen",
    ];
    const TENS: [&str; 10] = [
        "", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety",
    ];
    fn below_hundred(n: u32) -> String {
        match n {
            0..=19 => ONES[n as usize].to_string(),
            _ if n.is_multiple_of(10) => TENS[(n / 10) as usize].to_string(),
            _ => format!("{}-{}", TENS[(n / 10) as usize], ONES[(n % 10) as usize]),
        }
    }
    fn below_thousand(n: u32) -> String {
        match (n / 100, n % 100) {
            (0, r) => below_hundred(r),
            (h, 0) => format!("{} hundred", ONES[h as usize]),
            (h, r) => format!("{} hundred and {}", ONES[h as usize], below_hundred(r)),
        }
    }
    match (n / 1000, n % 1000) {
        (0, r) => below_thousand(r),
        (t, 0) => format!("{} thousand", below_thousand(t)),
        (t, r) if r < 100 => format!("{} thousand and {}", below_thousand(t), below_hundred(r)),
        (t, r) => format!("{} thousand, {}", below_thousand(t), below_thousand(r)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn polyp() -> PromptAttributes {
        PromptAttributes {
            class: "polyp".into(),
            shape: "round".into(),
            color: "pink".into(),
            size: "small".into(),
            number: "one".into(),
            location: "top left".into(),
        }
    }

    #[test]
    fn templates_match_medvlsm() {
        let a = polyp();
        assert_eq!(a.prompt(0).unwrap(), "");
        assert_eq!(a.prompt(1).unwrap(), "polyp");
        assert_eq!(a.prompt(2).unwrap(), "round polyp");
        assert_eq!(a.prompt(3).unwrap(), "pink round polyp");
        assert_eq!(a.prompt(4).unwrap(), "small pink round polyp");
        assert_eq!(a.prompt(5).unwrap(), "one small pink round polyp");
        assert_eq!(
            a.prompt(6).unwrap(),
            "one small pink round polyp, located in top left of the image"
        );
        assert_eq!(a.prompt(7), None);
        assert_eq!(a.presets().len(), 6);
    }

    #[test]
    fn unknown_attributes_are_left_out() {
        let a = PromptAttributes {
            class: "foot ulcer".into(),
            size: " medium ".into(),
            number: "two".into(),
            ..Default::default()
        };
        assert_eq!(a.prompt(3).unwrap(), "foot ulcer");
        assert_eq!(a.prompt(5).unwrap(), "two medium foot ulcer");
        assert_eq!(a.prompt(6).unwrap(), "two medium foot ulcer");
    }

    #[test]
    fn slugs_are_file_safe() {
        assert_eq!(slug("A pink, round polyp!"), "a-pink-round-polyp");
        assert_eq!(slug(""), "empty");
        assert_eq!(slug("../../etc"), "etc");
        assert!(slug(&"x".repeat(5000)).len() <= 48);
    }

    #[test]
    fn numbers_in_words_like_num2words() {
        for (n, w) in [
            (0, "zero"),
            (1, "one"),
            (13, "thirteen"),
            (20, "twenty"),
            (21, "twenty-one"),
            (99, "ninety-nine"),
            (100, "one hundred"),
            (105, "one hundred and five"),
            (342, "three hundred and forty-two"),
            (1000, "one thousand"),
            (1001, "one thousand and one"),
            (2345, "two thousand, three hundred and forty-five"),
        ] {
            assert_eq!(number_words(n), w);
        }
    }
}
