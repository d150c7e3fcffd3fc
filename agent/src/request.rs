//! The request grammar of the control filesystem: `key=value` tokens,
//! optionally double-quoted values, `#` comment lines; and its normalised
//! rendering, which is itself a valid request.

use std::fmt::Write as _;

/// Largest request accepted in one `write(2)`.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// Names that live at the root of the control filesystem.
pub const RESERVED_NAMES: [&str; 5] = ["README", "version", "request", "errors", "metrics"];

/// A parsed, validated request. `None` means the key was not given.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Request {
    pub name: Option<String>,
    pub source: String,
    pub destination: String,
    pub workflow: Option<String>,
    pub namespace: Option<String>,
    pub profile: Option<String>,
    pub dryrun: bool,
    pub slots: i32,
    pub max_slots: i32,
    pub dcp_options: String,
    pub mpirun_options: String,
    pub log_stdout: bool,
    pub store_stdout: bool,
}

/// Why a request was rejected, in words for the `errors` file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ParseError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, ParseError> {
    Err(ParseError(msg.into()))
}

/// Splits the request text into `(key, value)` pairs.
fn tokenize(text: &str) -> Result<Vec<(String, String)>, ParseError> {
    let mut pairs = Vec::new();
    let mut chars = text.chars().peekable();
    let mut at_line_start = true;
    loop {
        // Skip whitespace; a `#` first on a line starts a comment.
        while let Some(&c) = chars.peek() {
            if c == '\n' {
                at_line_start = true;
                chars.next();
            } else if c.is_whitespace() {
                chars.next();
            } else if c == '#' && at_line_start {
                for c in chars.by_ref() {
                    if c == '\n' {
                        break;
                    }
                }
            } else {
                break;
            }
        }
        if chars.peek().is_none() {
            return Ok(pairs);
        }
        at_line_start = false;
        let mut key = String::new();
        loop {
            match chars.peek() {
                Some('=') => {
                    chars.next();
                    break;
                }
                Some(c) if c.is_whitespace() => return err(format!("missing '=' after '{key}'")),
                None => return err(format!("missing '=' after '{key}'")),
                Some('"') => return err(format!("unexpected '\"' in key '{key}'")),
                Some(&c) => {
                    key.push(c);
                    chars.next();
                }
            }
        }
        if key.is_empty() {
            return err("missing key before '='");
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next() {
                    None => return err(format!("unterminated quote in value of '{key}'")),
                    Some('"') => break,
                    Some('\\') => match chars.next() {
                        Some('"') => value.push('"'),
                        Some('\\') => value.push('\\'),
                        Some('n') => value.push('\n'),
                        Some(c) => {
                            return err(format!("unknown escape '\\{c}' in value of '{key}'"))
                        }
                        None => return err(format!("unterminated quote in value of '{key}'")),
                    },
                    Some(c) => value.push(c),
                }
            }
            match chars.peek() {
                Some(c) if !c.is_whitespace() => {
                    return err(format!(
                        "unexpected '{c}' after the closing quote of '{key}'"
                    ))
                }
                _ => {}
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                if c == '"' {
                    return err(format!(
                        "unexpected '\"' inside the unquoted value of '{key}'"
                    ));
                }
                value.push(c);
                chars.next();
            }
        }
        pairs.push((key, value));
    }
}

fn parse_bool(key: &str, value: &str) -> Result<bool, ParseError> {
    match value {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        _ => err(format!(
            "{key}: '{value}' is not a boolean (true/false, 1/0, yes/no)"
        )),
    }
}

fn parse_slots(key: &str, value: &str) -> Result<i32, ParseError> {
    match value.parse::<i32>() {
        Ok(n) if n >= -1 => Ok(n),
        _ => err(format!("{key}: '{value}' is not an integer >= -1")),
    }
}

/// Checks an operation name: 1–63 of `[A-Za-z0-9._-]`, starting with a
/// letter or digit, not a fixed name of the root.
pub fn validate_name(name: &str) -> Result<(), ParseError> {
    let valid_chars = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    let starts_well = name
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphanumeric());
    if name.is_empty() || name.len() > 63 || !valid_chars || !starts_well {
        return err(format!(
            "name: '{name}' is not 1-63 characters of [A-Za-z0-9._-] starting with a letter or digit"
        ));
    }
    if RESERVED_NAMES.contains(&name) {
        return err(format!("name: '{name}' is reserved"));
    }
    Ok(())
}

fn validate_path(key: &str, value: &str) -> Result<(), ParseError> {
    if value.is_empty() {
        return err(format!("{key} is empty"));
    }
    if !value.starts_with('/') {
        return err(format!("{key}: '{value}' is not an absolute path"));
    }
    Ok(())
}

impl Request {
    /// Parses the bytes of one `write(2)`.
    pub fn parse(bytes: &[u8]) -> Result<Request, ParseError> {
        if bytes.len() > MAX_REQUEST_BYTES {
            return err(format!(
                "request is {} bytes, over the {MAX_REQUEST_BYTES}-byte limit",
                bytes.len()
            ));
        }
        if bytes.contains(&0) {
            return err("request contains a NUL byte");
        }
        let text = std::str::from_utf8(bytes)
            .map_err(|_| ParseError("request is not valid UTF-8".into()))?;
        let mut req = Request {
            slots: -1,
            max_slots: -1,
            ..Request::default()
        };
        let mut seen: Vec<String> = Vec::new();
        let mut have_source = false;
        let mut have_destination = false;
        for (key, value) in tokenize(text)? {
            if seen.contains(&key) {
                return err(format!("key '{key}' given twice"));
            }
            match key.as_str() {
                "source" => {
                    validate_path("source", &value)?;
                    req.source = value;
                    have_source = true;
                }
                "destination" => {
                    validate_path("destination", &value)?;
                    req.destination = value;
                    have_destination = true;
                }
                "name" => {
                    validate_name(&value)?;
                    req.name = Some(value);
                }
                "workflow" => req.workflow = Some(value),
                "namespace" => req.namespace = Some(value),
                "profile" => {
                    if value.is_empty() {
                        return err("profile is empty");
                    }
                    req.profile = Some(value)
                }
                "dryrun" => req.dryrun = parse_bool(&key, &value)?,
                "slots" => req.slots = parse_slots(&key, &value)?,
                "max_slots" => req.max_slots = parse_slots(&key, &value)?,
                "dcp_options" => req.dcp_options = value,
                "mpirun_options" => req.mpirun_options = value,
                "log_stdout" => req.log_stdout = parse_bool(&key, &value)?,
                "store_stdout" => req.store_stdout = parse_bool(&key, &value)?,
                _ => return err(format!("unknown key '{key}'")),
            }
            seen.push(key);
        }
        if !have_source {
            return err("source is required");
        }
        if !have_destination {
            return err("destination is required");
        }
        Ok(req)
    }

    /// Checks a request that arrived typed (the gRPC door) exactly as
    /// `parse` checks its text form, with the same words: the size of that
    /// text, NUL bytes, then each field in the contract's order.
    pub fn check(&self) -> Result<(), ParseError> {
        let size = self.render().len();
        if size > MAX_REQUEST_BYTES {
            return err(format!(
                "request is {size} bytes, over the {MAX_REQUEST_BYTES}-byte limit"
            ));
        }
        let texts = [
            self.name.as_deref().unwrap_or(""),
            &self.source,
            &self.destination,
            self.workflow.as_deref().unwrap_or(""),
            self.namespace.as_deref().unwrap_or(""),
            self.profile.as_deref().unwrap_or(""),
            &self.dcp_options,
            &self.mpirun_options,
        ];
        if texts.iter().any(|t| t.contains('\0')) {
            return err("request contains a NUL byte");
        }
        if let Some(name) = &self.name {
            validate_name(name)?;
        }
        validate_path("source", &self.source)?;
        validate_path("destination", &self.destination)?;
        if self.profile.as_deref() == Some("") {
            return err("profile is empty");
        }
        for (key, value) in [("slots", self.slots), ("max_slots", self.max_slots)] {
            if value < -1 {
                return err(format!("{key}: '{value}' is not an integer >= -1"));
            }
        }
        Ok(())
    }

    /// The normalised form: one `key=value` a line, in the contract's order.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut line = |key: &str, value: &str| {
            let _ = writeln!(out, "{key}={}", quote(value));
        };
        if let Some(name) = &self.name {
            line("name", name);
        }
        line("source", &self.source);
        line("destination", &self.destination);
        if let Some(workflow) = &self.workflow {
            line("workflow", workflow);
        }
        if let Some(namespace) = &self.namespace {
            line("namespace", namespace);
        }
        if let Some(profile) = &self.profile {
            line("profile", profile);
        }
        line("dryrun", bool_word(self.dryrun));
        line("slots", &self.slots.to_string());
        line("max_slots", &self.max_slots.to_string());
        line("dcp_options", &self.dcp_options);
        line("mpirun_options", &self.mpirun_options);
        line("log_stdout", bool_word(self.log_stdout));
        line("store_stdout", bool_word(self.store_stdout));
        out
    }
}

fn bool_word(b: bool) -> &'static str {
    if b {
        "true"
    } else {
        "false"
    }
}

/// Quotes a value when the grammar needs it to read it back unchanged.
pub fn quote(value: &str) -> String {
    let needs = value.is_empty()
        || value
            .chars()
            .any(|c| c.is_whitespace() || c == '"' || c == '\\' || c == '#');
    if !needs {
        return value.to_string();
    }
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn typed_requests_are_checked_as_their_text_would_be() {
        let ok = Request {
            source: "/a".into(),
            destination: "/b c".into(),
            dcp_options: "--x \"y\"".into(),
            slots: -1,
            max_slots: 3,
            ..Request::default()
        };
        let cases = [
            ok.clone(),
            Request {
                source: "rel".into(),
                ..ok.clone()
            },
            Request {
                source: String::new(),
                ..ok.clone()
            },
            Request {
                destination: String::new(),
                ..ok.clone()
            },
            Request {
                slots: -2,
                ..ok.clone()
            },
            Request {
                max_slots: -7,
                ..ok.clone()
            },
            Request {
                mpirun_options: "a\0b".into(),
                ..ok.clone()
            },
            Request {
                name: Some("README".into()),
                ..ok.clone()
            },
            Request {
                name: Some("-x".into()),
                ..ok.clone()
            },
            Request {
                profile: Some(String::new()),
                ..ok.clone()
            },
            Request {
                dcp_options: "x".repeat(MAX_REQUEST_BYTES),
                ..ok.clone()
            },
        ];
        for request in cases {
            let text = Request::parse(request.render().as_bytes()).map(drop);
            assert_eq!(request.check(), text, "{request:?}");
        }
    }

    #[test]
    fn parses_the_readme_example() {
        let r = Request::parse(b"name=ckpt-out-42 source=/a/step10 destination=/lus/me/step10\n")
            .unwrap();
        assert_eq!(r.name.as_deref(), Some("ckpt-out-42"));
        assert_eq!(r.source, "/a/step10");
        assert_eq!(r.destination, "/lus/me/step10");
        assert_eq!((r.slots, r.max_slots), (-1, -1));
    }

    #[test]
    fn quotes_escapes_and_comments() {
        let text = "# a comment line\nsource=/a\tdestination=\"/b c\"\n  # indented comment\ndcp_options=\"--chunksize 1MB \\\"x\\\" \\\\ \\n\"\n";
        let r = Request::parse(text.as_bytes()).unwrap();
        assert_eq!(r.destination, "/b c");
        assert_eq!(r.dcp_options, "--chunksize 1MB \"x\" \\ \n");
    }

    #[test]
    fn rejections_name_the_problem() {
        let cases: &[(&[u8], &str)] = &[
            (b"source=/a destination=/b bogus=1", "unknown key 'bogus'"),
            (b"source=/a source=/c destination=/b", "given twice"),
            (b"source=/a destination", "missing '='"),
            (b"source=/a destination=\"/b", "unterminated quote"),
            (b"source=a destination=/b", "not an absolute path"),
            (b"source=/a", "destination is required"),
            (
                b"source=/a destination=/b name=-x",
                "is not 1-63 characters",
            ),
            (b"source=/a destination=/b name=errors", "reserved"),
            (b"source=/a destination=/b dryrun=maybe", "not a boolean"),
            (b"source=/a destination=/b slots=-2", "integer >= -1"),
            (b"source=/a\0 destination=/b", "NUL byte"),
            (b"source=/\xff destination=/b", "UTF-8"),
            (b"Source=/a destination=/b", "unknown key 'Source'"),
        ];
        for (input, want) in cases {
            let e = Request::parse(input).unwrap_err();
            assert!(
                e.0.contains(want),
                "{:?}: got {:?}, want {want:?}",
                String::from_utf8_lossy(input),
                e.0
            );
        }
        let big = vec![b' '; MAX_REQUEST_BYTES + 1];
        assert!(Request::parse(&big).unwrap_err().0.contains("limit"));
    }

    #[test]
    fn booleans_accept_the_three_spellings() {
        for (word, want) in [
            ("true", true),
            ("1", true),
            ("yes", true),
            ("false", false),
            ("0", false),
            ("no", false),
        ] {
            let r = Request::parse(format!("source=/a destination=/b dryrun={word}").as_bytes())
                .unwrap();
            assert_eq!(r.dryrun, want);
        }
    }

    fn value_strategy() -> impl Strategy<Value = String> {
        "[ -~\t\n]{0,20}"
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Request::parse(&bytes);
        }

        #[test]
        fn normalised_requests_round_trip(
            source in "/[ -~]{0,30}",
            destination in "/[ -~]{0,30}",
            name in proptest::option::of("[a-z0-9][a-z0-9._-]{0,20}"),
            workflow in proptest::option::of(value_strategy()),
            dcp in value_strategy(),
            mpirun in value_strategy(),
            slots in -1i32..64,
            dryrun in any::<bool>(),
        ) {
            let original = Request {
                name, source, destination, workflow, namespace: None, profile: Some("default".into()),
                dryrun, slots, max_slots: -1, dcp_options: dcp, mpirun_options: mpirun,
                log_stdout: false, store_stdout: true,
            };
            prop_assume!(original.name.as_deref().is_none_or(|n| validate_name(n).is_ok()));
            let text = original.render();
            let parsed = Request::parse(text.as_bytes()).unwrap();
            prop_assert_eq!(parsed, original);
        }
    }
}
