//! generate.py's prompt syntax: `text:weight:stop`, `|` between prompts, `^` between
//! story phrases.
//!
//! Fields are peeled from the right, and only a field that is a plain number counts as
//! a weight or stop, so `https://example.com/a:b` stays text. One refinement over
//! generate.py: a trailing unsigned integer right after a digit (`at 12:30`, `16:9`)
//! is read as text, since times and aspect ratios are far likelier than a weight
//! written that way; write `photo 2:2.0` (or use the list form) to weight such a prompt.

use serde::{Deserialize, Serialize};

use super::check::SpecError;

/// Text prompts in either of the two accepted shapes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PromptsSpec {
    /// generate.py syntax: `|` between prompts, `^` between story phrases.
    Syntax(String),
    /// Explicit prompts: one phrase, no story.
    List(Vec<TextPromptSpec>),
}

impl Default for PromptsSpec {
    fn default() -> Self {
        PromptsSpec::List(Vec::new())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextPromptSpec {
    pub text: String,
    #[serde(default = "default_weight")]
    pub weight: f32,
    /// The loss for this prompt is not pushed below `stop` (generate.py's third field).
    #[serde(default)]
    pub stop: Option<f32>,
}

fn default_weight() -> f32 {
    1.0
}

/// Prompts parsed (text or list form), by marker. A job's prompts are parsed once, when
/// it is validated; tests watch a marker in their prompts to hold every later hop to that.
pub static PARSED: crate::models::text_counter::TextCounter =
    crate::models::text_counter::TextCounter::new();

/// One text prompt after parsing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextPrompt {
    pub text: String,
    /// Negative weights repel.
    pub weight: f32,
    /// The prompt's loss is not pushed below this.
    pub stop: Option<f32>,
}

/// Story phrases, each a set of prompts used together.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct PromptSet {
    pub phrases: Vec<Vec<TextPrompt>>,
}

impl PromptSet {
    /// The phrase in force at `step`: generate.py advances one phrase every
    /// `change_prompt_every` steps and wraps around at the end.
    pub fn phrase_index_at(&self, step: u32, change_prompt_every: u32) -> usize {
        if self.phrases.is_empty() || change_prompt_every == 0 {
            return 0;
        }
        (step / change_prompt_every) as usize % self.phrases.len()
    }
}

/// Parses either shape of `prompts` into phrases.
pub fn prompt_set(spec: &PromptsSpec) -> Result<PromptSet, SpecError> {
    match spec {
        PromptsSpec::Syntax(s) => parse_story(s),
        PromptsSpec::List(list) => {
            let mut phrase = Vec::with_capacity(list.len());
            for (i, p) in list.iter().enumerate() {
                PARSED.note(&p.text);
                if p.text.trim().is_empty() {
                    return Err(SpecError::new(
                        format!("prompts[{i}].text"),
                        "must not be empty",
                        "got an empty prompt text",
                    ));
                }
                phrase.push(TextPrompt {
                    text: p.text.trim().to_owned(),
                    weight: p.weight,
                    stop: p.stop,
                });
            }
            Ok(PromptSet {
                phrases: if phrase.is_empty() {
                    Vec::new()
                } else {
                    vec![phrase]
                },
            })
        }
    }
}

/// Parses a whole `prompts` string: `^`-separated phrases of `|`-separated prompts.
/// An empty or all-whitespace string gives no phrases.
pub fn parse_story(s: &str) -> Result<PromptSet, SpecError> {
    if s.trim().is_empty() {
        return Ok(PromptSet::default());
    }
    let mut phrases = Vec::new();
    let mut index = 0;
    for (p, phrase) in s.split('^').enumerate() {
        if phrase.trim().is_empty() {
            return Err(SpecError::new(
                "prompts",
                "story phrases between `^` must not be empty",
                format!("phrase {} of {s:?} is empty", p + 1),
            ));
        }
        let mut prompts = Vec::new();
        for part in phrase.split('|') {
            prompts.push(parse_prompt(part).map_err(|(rule, detail)| {
                SpecError::new(format!("prompts[{index}]"), rule, detail)
            })?);
            index += 1;
        }
        phrases.push(prompts);
    }
    Ok(PromptSet { phrases })
}

/// Parses one `text[:weight[:stop]]`. Errors are (rule, detail).
pub fn parse_prompt(s: &str) -> Result<TextPrompt, (String, String)> {
    PARSED.note(s);
    let s = s.trim();
    if s.is_empty() {
        return Err((
            "must not be empty".to_owned(),
            "an empty prompt between `|` separators; remove the extra `|`".to_owned(),
        ));
    }
    // Peel up to two numeric fields from the right.
    let mut text = s;
    let mut fields: Vec<&str> = Vec::new();
    while fields.len() < 2 {
        match text.rsplit_once(':') {
            Some((head, tail)) if is_number(tail.trim()) => {
                fields.insert(0, tail);
                text = head;
            }
            _ => break,
        }
    }
    // `at 12:30`, `16:9`: give back an integer field that follows a digit.
    while let Some(first) = fields.first() {
        let follows_digit = text.ends_with(|c: char| c.is_ascii_digit());
        if follows_digit && first.chars().all(|c| c.is_ascii_digit()) {
            let len = text.len() + 1 + first.len();
            text = &s[..len];
            fields.remove(0);
        } else {
            break;
        }
    }
    let text = text.trim();
    if text.is_empty() {
        return Err((
            "must have text before its weight".to_owned(),
            format!("got {s:?}; write `text:weight` or `text:weight:stop`"),
        ));
    }
    let number = |f: &str, what: &str| -> Result<f32, (String, String)> {
        let v: f32 = f.parse().map_err(|_| {
            (
                format!("{what} must be a number"),
                format!("got {f:?} in {s:?}"),
            )
        })?;
        if !v.is_finite() {
            return Err((
                format!("{what} must be a finite number"),
                format!("got {f:?} in {s:?}"),
            ));
        }
        Ok(v)
    };
    let weight = match fields.first() {
        Some(f) => number(f.trim(), "weight")?,
        None => 1.0,
    };
    let stop = match fields.get(1) {
        Some(f) => Some(number(f.trim(), "stop")?),
        None => None,
    };
    Ok(TextPrompt {
        text: text.to_owned(),
        weight,
        stop,
    })
}

/// A plain decimal number: `2`, `-0.5`, `.5`, `1e-3`. Words like `inf` or `nan` are text.
fn is_number(s: &str) -> bool {
    let s = s.strip_prefix(['+', '-']).unwrap_or(s);
    let (mantissa, exponent) = match s.find(['e', 'E']) {
        Some(i) => (&s[..i], Some(&s[i + 1..])),
        None => (s, None),
    };
    let digits = |t: &str| !t.is_empty() && t.chars().all(|c| c.is_ascii_digit());
    let mantissa_ok = match mantissa.split_once('.') {
        Some((a, b)) => {
            (digits(a) || a.is_empty())
                && (digits(b) || b.is_empty())
                && !(a.is_empty() && b.is_empty())
        }
        None => digits(mantissa),
    };
    let exponent_ok = match exponent {
        Some(e) => digits(e.strip_prefix(['+', '-']).unwrap_or(e)),
        None => true,
    };
    mantissa_ok && exponent_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(s: &str) -> TextPrompt {
        parse_prompt(s).unwrap()
    }

    #[test]
    fn weight_and_stop() {
        assert_eq!(
            one("a cat"),
            TextPrompt {
                text: "a cat".into(),
                weight: 1.0,
                stop: None
            }
        );
        assert_eq!(
            one("a cat:2"),
            TextPrompt {
                text: "a cat".into(),
                weight: 2.0,
                stop: None
            }
        );
        assert_eq!(
            one(" a cat : -0.5 : -1 "),
            TextPrompt {
                text: "a cat".into(),
                weight: -0.5,
                stop: Some(-1.0)
            }
        );
        assert_eq!(
            one("a:1:2"),
            TextPrompt {
                text: "a".into(),
                weight: 1.0,
                stop: Some(2.0)
            }
        );
        assert_eq!(one("x:.5").weight, 0.5);
        assert_eq!(one("x:1e-1").weight, 0.1);
    }

    #[test]
    fn colons_in_text_and_urls_are_text() {
        assert_eq!(
            one("https://example.com/a.png").text,
            "https://example.com/a.png"
        );
        assert_eq!(
            one("https://example.com:8080/a.png:0.5").text,
            "https://example.com:8080/a.png"
        );
        assert_eq!(one("https://example.com:8080/a.png:0.5").weight, 0.5);
        assert_eq!(one("style: baroque").text, "style: baroque");
        assert_eq!(one("title: dune:3").text, "title: dune");
        assert_eq!(one("title: dune:3").weight, 3.0);
        // Only two numeric fields are peeled; the rest is text.
        let p = one("a:b:2:3");
        assert_eq!((p.text.as_str(), p.weight, p.stop), ("a:b", 2.0, Some(3.0)));
        assert_eq!(one("weight:inf").text, "weight:inf");
    }

    #[test]
    fn times_and_ratios_stay_text() {
        assert_eq!(
            one("a clock at 12:30"),
            TextPrompt {
                text: "a clock at 12:30".into(),
                weight: 1.0,
                stop: None
            }
        );
        assert_eq!(one("16:9 landscape").text, "16:9 landscape");
        assert_eq!(one("cinema 16:9").text, "cinema 16:9");
        let p = one("cinema 16:9:0.5");
        assert_eq!((p.text.as_str(), p.weight), ("cinema 16:9", 0.5));
        let p = one("photo 2:-1");
        assert_eq!((p.text.as_str(), p.weight), ("photo 2", -1.0));
    }

    #[test]
    fn pipes_and_stories() {
        let set = parse_story("a wooden banana temple | trending on artstation:0.5").unwrap();
        assert_eq!(set.phrases.len(), 1);
        assert_eq!(set.phrases[0][1].text, "trending on artstation");
        assert_eq!(set.phrases[0][1].weight, 0.5);

        let set = parse_story("a forest ^ a city:2|rain:-1 ^ the sea").unwrap();
        assert_eq!(set.phrases.len(), 3);
        assert_eq!(set.phrases[1].len(), 2);
        assert_eq!(set.phrases[1][1].weight, -1.0);
        assert_eq!(set.phrase_index_at(0, 10), 0);
        assert_eq!(set.phrase_index_at(9, 10), 0);
        assert_eq!(set.phrase_index_at(10, 10), 1);
        assert_eq!(set.phrase_index_at(25, 10), 2);
        assert_eq!(set.phrase_index_at(30, 10), 0);
        assert_eq!(set.phrase_index_at(30, 0), 0);
    }

    #[test]
    fn bad_syntax_is_a_clear_error() {
        let err = parse_story("a||b").unwrap_err();
        assert_eq!(err.field, "prompts[1]");
        assert!(err.to_string().contains("empty"), "{err}");
        let err = parse_story("a ^ ^ b").unwrap_err();
        assert!(err.rule.contains("story"), "{err}");
        let err = parse_story("cat|:0.5").unwrap_err();
        assert_eq!(err.field, "prompts[1]");
        assert!(err.rule.contains("text before its weight"), "{err}");
        let err = parse_story("cat:1e60").unwrap_err();
        assert!(err.rule.contains("finite"), "{err}");
        assert_eq!(parse_story("  ").unwrap().phrases.len(), 0);
    }

    #[test]
    fn list_form_is_taken_verbatim() {
        let spec: PromptsSpec = serde_json::from_str(
            r#"[{"text": "ratio 3:2"}, {"text": "b", "weight": -1, "stop": 0.5}]"#,
        )
        .unwrap();
        let set = prompt_set(&spec).unwrap();
        assert_eq!(set.phrases[0][0].text, "ratio 3:2");
        assert_eq!(set.phrases[0][1].stop, Some(0.5));
        let spec: PromptsSpec = serde_json::from_str(r#"[{"text": " "}]"#).unwrap();
        assert_eq!(prompt_set(&spec).unwrap_err().field, "prompts[0].text");
    }
}
