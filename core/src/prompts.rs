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

/// The size, count and location words medvlsm measures from a mask (R-OLD
/// `scripts/features_from_img.py`), reproduced with its quirks:
/// - objects are the 4-connected components of `grey > 127.5`; the count is all of them;
/// - an object's coverage counts only its pixels that are exactly 255 (the script compares
///   `mask / 255 == 1`), so JPEG masks measure a little smaller; objects covering ≤ 0.01 %
///   of the image get no size word; sizes: > 0.30 large, > 0.08 medium, < 0.001 tiny, else
///   small; the size words present are listed once each, smallest first;
/// - each object gets a location on a 3×3 grid from where its 255-pixels lie: the only cell
///   it touches; else the only cell holding ≥ 10 % of it; else, if none does, the cell
///   holding the *least* (sic) of it; else (several cells ≥ 10 %) the cell of its bounding
///   box's centre, measured from its level-128 contour, with the column compared against
///   thirds of the image *height* (sic); the locations of all objects are joined by ", ".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaskAttributes {
    pub count: usize,
    pub size: String,
    pub location: String,
}

/// The 3×3 grid's cell names, row by row.
const GRID: [&str; 9] = [
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
];

/// Measures [`MaskAttributes`] from an 8-bit grey mask, row-major `width`×`height`.
pub fn mask_attributes(grey: &[u8], width: usize, height: usize) -> MaskAttributes {
    let (labels, count) = label_components(grey, width, height);
    let mut objects: Vec<Vec<usize>> = vec![Vec::new(); count];
    for (i, &l) in labels.iter().enumerate() {
        if l > 0 {
            objects[l as usize - 1].push(i);
        }
    }
    let total = (width * height) as f64;
    let mut sizes = [false; 4]; // tiny, small, medium, large
    let mut locations = Vec::with_capacity(count);
    for pixels in &objects {
        let white: Vec<usize> = pixels.iter().copied().filter(|&i| grey[i] == 255).collect();
        let coverage = white.len() as f64 / total;
        if coverage > 0.0001 {
            let class = if coverage > 0.30 {
                3
            } else if coverage > 0.08 {
                2
            } else if coverage < 0.001 {
                0
            } else {
                1
            };
            sizes[class] = true;
        }
        locations.push(object_location(grey, pixels, &white, width, height));
    }
    let size = ["tiny", "small", "medium", "large"]
        .iter()
        .zip(sizes)
        .filter(|(_, present)| *present)
        .map(|(w, _)| *w)
        .collect::<Vec<_>>()
        .join(", ");
    MaskAttributes {
        count,
        size,
        location: locations.join(", "),
    }
}

fn object_location(
    grey: &[u8],
    pixels: &[usize],
    white: &[usize],
    width: usize,
    height: usize,
) -> String {
    // Python's int(h / 3) and int(2 * h / 3) band edges.
    let band = |v: usize, n: usize| {
        if v < n / 3 {
            0
        } else if v < 2 * n / 3 {
            1
        } else {
            2
        }
    };
    let mut cells = [0usize; 9];
    for &i in white {
        cells[band(i / width, height) * 3 + band(i % width, width)] += 1;
    }
    if white.is_empty() {
        // The script divides 0 by 0: every cell is NaN, "non-zero", none is ≥ 0.1, and a
        // stable sort by NaN keeps the first cell.
        return GRID[0].into();
    }
    let share: Vec<f64> = cells
        .iter()
        .map(|&c| c as f64 / white.len() as f64)
        .collect();
    let touched: Vec<usize> = (0..9).filter(|&c| share[c] != 0.0).collect();
    if touched.len() == 1 {
        return GRID[touched[0]].into();
    }
    let significant: Vec<usize> = (0..9).filter(|&c| share[c] >= 0.1).collect();
    match significant.len() {
        0 => {
            let least = touched
                .iter()
                .copied()
                .min_by(|&a, &b| share[a].total_cmp(&share[b]))
                .expect("an object touches a cell");
            GRID[least].into()
        }
        1 => GRID[significant[0]].into(),
        _ => {
            let (top, r1, left, c1) = contour_box(grey, pixels, width, height);
            let centre_row = (top + r1 + 1) as f64 / 2.0;
            let centre_col = (left + c1 + 1) as f64 / 2.0;
            let h = height as f64;
            let third = |v: f64, names: [&'static str; 3]| {
                if v < h / 3.0 {
                    names[0]
                } else if v <= 2.0 * h / 3.0 {
                    names[1]
                } else {
                    names[2]
                }
            };
            let vertical = third(centre_row, ["top", "center", "bottom"]);
            let horizontal = third(centre_col, ["left", "center", "right"]);
            match (vertical, horizontal) {
                ("center", h) => h.into(),
                (v, "center") => v.into(),
                (v, h) => format!("{v} {h}"),
            }
        }
    }
}

/// The box (first row, last row, first column, last column) the script takes for an
/// object: it draws the object's level-128 contour (skimage `find_contours` on the object's
/// grey values, zero elsewhere), truncating each contour point to a pixel, labels those
/// pixels 8-connected and keeps the first region in raster order. Contour points lie on
/// the edges between 4-neighbours on either side of the level (inside = value > 128), at
/// the linearly interpolated crossing. An object touching the image border has an open
/// contour that can fall apart into several regions, so the box may cover only part of it.
fn contour_box(
    grey: &[u8],
    pixels: &[usize],
    width: usize,
    height: usize,
) -> (usize, usize, usize, usize) {
    let (mut r0, mut r1, mut c0, mut c1) = (usize::MAX, 0, usize::MAX, 0);
    for &i in pixels {
        r0 = r0.min(i / width);
        r1 = r1.max(i / width);
        c0 = c0.min(i % width);
        c1 = c1.max(i % width);
    }
    // A window one pixel larger than the object (clipped), holding the object's values.
    let (wr0, wc0) = (r0.saturating_sub(1), c0.saturating_sub(1));
    let (wr1, wc1) = ((r1 + 1).min(height - 1), (c1 + 1).min(width - 1));
    let (ww, wh) = (wc1 - wc0 + 1, wr1 - wr0 + 1);
    let mut value = vec![0f64; ww * wh];
    for &i in pixels {
        value[(i / width - wr0) * ww + (i % width - wc0)] = f64::from(grey[i]);
    }
    let level = 128.0;
    let mut border = vec![false; ww * wh];
    let mut mark = |a: usize, b: usize| {
        let (va, vb) = (value[a], value[b]);
        if (va > level) != (vb > level) {
            let fraction = (level - va) / (vb - va);
            border[if fraction >= 1.0 { b } else { a }] = true;
        }
    };
    for r in 0..wh {
        for c in 0..ww {
            let i = r * ww + c;
            if c + 1 < ww {
                mark(i, i + 1);
            }
            if r + 1 < wh {
                mark(i, i + ww);
            }
        }
    }
    let Some(start) = border.iter().position(|&b| b) else {
        return (r0, r1, c0, c1);
    };
    // The first 8-connected region of contour pixels.
    let mut seen = vec![false; ww * wh];
    let mut stack = vec![start];
    seen[start] = true;
    let (mut b0, mut b1, mut d0, mut d1) = (usize::MAX, 0, usize::MAX, 0);
    while let Some(i) = stack.pop() {
        let (r, c) = (i / ww, i % ww);
        b0 = b0.min(r);
        b1 = b1.max(r);
        d0 = d0.min(c);
        d1 = d1.max(c);
        for dr in [-1isize, 0, 1] {
            for dc in [-1isize, 0, 1] {
                let (nr, nc) = (r as isize + dr, c as isize + dc);
                if nr < 0 || nc < 0 || nr >= wh as isize || nc >= ww as isize {
                    continue;
                }
                let j = nr as usize * ww + nc as usize;
                if border[j] && !seen[j] {
                    seen[j] = true;
                    stack.push(j);
                }
            }
        }
    }
    (b0 + wr0, b1 + wr0, d0 + wc0, d1 + wc0)
}

/// 4-connected components of `grey > 127`, numbered 1… in raster order of their first
/// pixel (as `scipy.ndimage.label`); 0 is background.
fn label_components(grey: &[u8], width: usize, height: usize) -> (Vec<u32>, usize) {
    let mut labels = vec![0u32; grey.len()];
    let mut count = 0;
    let mut stack = Vec::new();
    for start in 0..grey.len() {
        if grey[start] <= 127 || labels[start] != 0 {
            continue;
        }
        count += 1;
        labels[start] = count as u32;
        stack.push(start);
        while let Some(i) = stack.pop() {
            let (r, c) = (i / width, i % width);
            let mut visit = |j: usize| {
                if grey[j] > 127 && labels[j] == 0 {
                    labels[j] = count as u32;
                    stack.push(j);
                }
            };
            if c > 0 {
                visit(i - 1);
            }
            if c + 1 < width {
                visit(i + 1);
            }
            if r > 0 {
                visit(i - width);
            }
            if r + 1 < height {
                visit(i + width);
            }
        }
    }
    (labels, count)
}

/// medvlsm's P0–P9 for one image: P0–P6 from the templates, and when descriptions are given,
/// the lists P7 `{class} which is {d}`, P8 `{p5} which is {d}` and P9 `P8 located in
/// {location} of the image`.
pub fn study_prompts(
    attributes: &PromptAttributes,
    descriptions: &[String],
) -> std::collections::BTreeMap<String, crate::dataset::PromptValue> {
    use crate::dataset::PromptValue;
    let mut prompts = std::collections::BTreeMap::new();
    for p in TEMPLATE_IDS {
        if let Some(text) = attributes.prompt(p) {
            prompts.insert(format!("p{p}"), PromptValue::Text(text));
        }
    }
    if !descriptions.is_empty() {
        let class = attributes.class.trim();
        let p5 = attributes.prompt(5).unwrap_or_default();
        let location = attributes.location.trim();
        let list = |f: &dyn Fn(&str) -> String| {
            PromptValue::List(descriptions.iter().map(|d| f(d.trim())).collect())
        };
        prompts.insert("p7".into(), list(&|d| format!("{class} which is {d}")));
        prompts.insert("p8".into(), list(&|d| format!("{p5} which is {d}")));
        prompts.insert(
            "p9".into(),
            list(&|d| {
                if location.is_empty() {
                    format!("{p5} which is {d}")
                } else {
                    format!("{p5} which is {d} located in {location} of the image")
                }
            }),
        );
    }
    prompts
}

/// Control prompts for a prompt-robustness study (`vlsm bench --prompt-controls`): does the
/// model read the prompt at all? Built per annotation entry, each compared with the entry's
/// own prompt ([`CONTROL_REFERENCE`]). Ids and templates:
///
/// - `ctl-empty`: `""`, no text at all;
/// - `ctl-nonsense`: `"blicket"`, a made-up word;
/// - `ctl-wrong-class`: a healthy look-alike of the dataset's anatomy instead of the target
///   (`"a healthy colon"` for the polyp sets, `"healthy skin"` for ISIC, `"healthy skin of a
///   foot"` for DFU, `"healthy breast tissue"` for BUSI, `"healthy lungs"` for CAMUS and
///   CheXlocalize, `"healthy tissue"` for other datasets);
/// - `ctl-wrong-location`: the reference prompt with its location mirrored (left ↔ right,
///   top ↔ bottom, `center` → `top left`), when it says `located in … of the image`;
/// - `ctl-class-alone`: the entry's `p1` (the class name);
/// - `ctl-over-described`: the entry's longest prompt text (usually a `p9` member: class,
///   attributes, a description and the location).
///
/// A control that cannot be built for the entry (no location, no `p1`) is an `Err` saying
/// why.
pub fn control_prompts(
    dataset: &str,
    prompts: &std::collections::BTreeMap<String, crate::dataset::PromptValue>,
) -> Vec<(&'static str, Result<String, String>)> {
    use crate::dataset::PromptValue;
    let text = |id: &str| match prompts.get(id) {
        Some(PromptValue::Text(t)) => Some(t.clone()),
        _ => None,
    };
    let wrong_class = match dataset {
        d if d.contains("polyp") || d == "kvasir" => "a healthy colon",
        "isic" => "healthy skin",
        "dfu" => "healthy skin of a foot",
        "busi" => "healthy breast tissue",
        "camus" | "chexlocalize" => "healthy lungs",
        _ => "healthy tissue",
    };
    let reference = text(CONTROL_REFERENCE);
    let wrong_location = match &reference {
        None => Err(format!("no {CONTROL_REFERENCE} to move the location of")),
        Some(r) => {
            mirrored_location(r).ok_or_else(|| format!("{CONTROL_REFERENCE} names no location"))
        }
    };
    let longest = prompts
        .values()
        .flat_map(|v| v.texts().iter())
        .max_by_key(|t| t.chars().count())
        .cloned()
        .ok_or_else(|| "the entry has no prompts".to_string());
    vec![
        ("ctl-empty", Ok(String::new())),
        ("ctl-nonsense", Ok("blicket".into())),
        ("ctl-wrong-class", Ok(wrong_class.into())),
        ("ctl-wrong-location", wrong_location),
        (
            "ctl-class-alone",
            text("p1").ok_or_else(|| "the entry has no p1".to_string()),
        ),
        ("ctl-over-described", longest),
    ]
}

/// The prompt id controls are compared with: p6, the study's most specific single-string
/// template (class, attributes and location for the endoscopy and skin sets).
pub const CONTROL_REFERENCE: &str = "p6";

/// `prompt` with the cells of its `located in … of the image` mirrored, or `None`.
fn mirrored_location(prompt: &str) -> Option<String> {
    const START: &str = "located in ";
    const END: &str = " of the image";
    let at = prompt.find(START)? + START.len();
    let len = prompt[at..].find(END)?;
    let cells: Vec<String> = prompt[at..at + len]
        .split(", ")
        .map(|cell| {
            if cell == "center" {
                return "top left".to_string();
            }
            cell.split(' ')
                .map(|w| match w {
                    "left" => "right",
                    "right" => "left",
                    "top" => "bottom",
                    "bottom" => "top",
                    w => w,
                })
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    Some(format!(
        "{}{}{}",
        &prompt[..at],
        cells.join(", "),
        &prompt[at + len..]
    ))
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
    fn mask_attributes_by_hand() {
        // 9×9 image: a 3×3 block of 255 in the top-left cell and a single 200-pixel in the
        // bottom-right one (a second object with no 255 pixel).
        let (w, h) = (9, 9);
        let mut grey = vec![0u8; w * h];
        for r in 0..3 {
            for c in 0..3 {
                grey[r * w + c] = 255;
            }
        }
        grey[8 * w + 8] = 200;
        let a = mask_attributes(&grey, w, h);
        assert_eq!(a.count, 2);
        // 9/81 = 0.111 → medium; the second object has no size word.
        assert_eq!(a.size, "medium");
        assert_eq!(a.location, "top left, top left");
        // One object straddling the centre column: several significant cells → the
        // bounding-box centre (rows 3–5, columns 2–6 → row 4.0 or so: center; column 4.5:
        // center) → "center".
        let mut grey = vec![0u8; w * h];
        for r in 3..6 {
            for c in 2..7 {
                grey[r * w + c] = 255;
            }
        }
        let a = mask_attributes(&grey, w, h);
        assert_eq!(
            (a.count, a.size.as_str(), a.location.as_str()),
            (1, "medium", "center")
        );
        assert_eq!(mask_attributes(&[0; 4], 2, 2).count, 0);
    }

    #[test]
    fn study_prompts_p7_to_p9() {
        let a = PromptAttributes {
            class: "polyp".into(),
            color: "white".into(),
            shape: "round".into(),
            size: "small, medium".into(),
            number: "three".into(),
            location: "top left, right".into(),
        };
        let p = study_prompts(&a, &["a projecting growth of tissue".into()]);
        assert_eq!(p.len(), 10);
        assert_eq!(
            p["p7"].texts(),
            ["polyp which is a projecting growth of tissue"]
        );
        assert_eq!(
            p["p9"].texts(),
            [
                "three small, medium white round polyp which is a projecting growth of tissue located in top left, right of the image"
            ]
        );
        assert_eq!(study_prompts(&a, &[]).len(), 7);
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

    #[test]
    fn control_prompts_follow_their_templates() {
        use crate::dataset::PromptValue;
        let prompts: std::collections::BTreeMap<String, PromptValue> = [
            ("p0", PromptValue::Text(String::new())),
            ("p1", PromptValue::Text("polyp".into())),
            (
                "p6",
                PromptValue::Text("one large white round polyp, located in top left, center of the image".into()),
            ),
            (
                "p9",
                PromptValue::List(vec!["one large white round polyp which is a projecting growth of tissue located in top left, center of the image".into()]),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let controls = control_prompts("kvasir_polyp", &prompts);
        let get = |id: &str| controls.iter().find(|(c, _)| *c == id).unwrap().1.clone();
        assert_eq!(get("ctl-empty"), Ok(String::new()));
        assert_eq!(get("ctl-nonsense"), Ok("blicket".into()));
        assert_eq!(get("ctl-wrong-class"), Ok("a healthy colon".into()));
        assert_eq!(
            get("ctl-wrong-location"),
            Ok(
                "one large white round polyp, located in bottom right, top left of the image"
                    .into()
            )
        );
        assert_eq!(get("ctl-class-alone"), Ok("polyp".into()));
        assert!(
            get("ctl-over-described")
                .unwrap()
                .starts_with("one large white round polyp which is")
        );
        assert_eq!(
            control_prompts("isic", &std::collections::BTreeMap::new())[3].1,
            Err("no p6 to move the location of".to_string())
        );
        assert_eq!(
            control_prompts("mine", &prompts)[2].1,
            Ok("healthy tissue".into())
        );
    }
}
