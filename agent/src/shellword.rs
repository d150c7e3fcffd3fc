//! Text that reaches a shell: the rule for what the Kubernetes backend lets
//! through to the Rabbit, and the quoting the local backend uses when it
//! fills a command profile.
//!
//! The Rabbit's worker (upstream nnf-dm
//! `internal/controller/helpers/datamovement_helpers.go` `BuildDMCommand`,
//! run by `internal/controller/datamovement_controller.go` with
//! `/bin/bash -c`) pastes `dcpOptions`, `mpirunOptions` and the paths into
//! the profile's command unquoted, as root. Quoting cannot help there (the
//! worker also splits the command on spaces), so the agent accepts only words
//! bash passes through unchanged (README.md, "The Kubernetes backend").

use crate::request::Request;

/// Characters bash interprets anywhere in an unquoted word (or that end it):
/// quoting, substitution, globbing, history expansion, redirection, lists.
const SPECIAL_ANYWHERE: &[char] = &[
    '"', '\'', '`', '\\', ';', '&', '|', '<', '>', '(', ')', '$', '*', '?', '[', ']', '{', '}', '!',
];

/// Why `c` at byte `at` of `word` would be read by bash as more than itself.
fn special(word: &str, at: usize, c: char) -> Option<&'static str> {
    if c.is_control() {
        return Some("a control character");
    }
    if SPECIAL_ANYWHERE.contains(&c) {
        return Some("special to the shell");
    }
    let previous = word[..at].chars().next_back();
    match c {
        '~' | '#' if previous.is_none() => Some("special to the shell at the start of a word"),
        // bash expands `NAME=~/x` and `NAME=a:~/x` even as a command's
        // argument (`-x FOO=~/x`), so a tilde after `=` or `:` counts as the
        // start of a word too.
        '~' if matches!(previous, Some('=' | ':')) => Some("special to the shell after '=' or ':'"),
        _ => None,
    }
}

/// `c` as the reasons name it: `';'`, `"'"`, or `U+000A` for a control
/// character (which would not show).
pub fn name_of(c: char) -> String {
    if c.is_control() {
        format!("U+{:04X}", c as u32)
    } else if c == '\'' {
        "\"'\"".into()
    } else {
        format!("'{c}'")
    }
}

/// The first character of `value` that bash would interpret, and why.
fn first_special(value: &str) -> Option<(char, &'static str)> {
    for word in value.split(' ') {
        for (at, c) in word.char_indices() {
            if let Some(why) = special(word, at, c) {
                return Some((c, why));
            }
        }
    }
    None
}

/// `dcp_options`/`mpirun_options` for the Rabbit: the words as given, one
/// space apart, or why not.
pub fn rabbit_options(key: &str, value: &str) -> Result<String, String> {
    if let Some((c, why)) = first_special(value) {
        return Err(format!(
            "{key}: the character {} is {why}, and the Rabbit runs {key} through bash as root; \
             only plain words are accepted (letters, digits, - _ . = , : / + @ %)",
            name_of(c)
        ));
    }
    Ok(value
        .split(' ')
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" "))
}

/// A `source`/`destination` path for the Rabbit: one plain word.
pub fn rabbit_path(key: &str, value: &str) -> Result<(), String> {
    if let Some(c) = value.chars().find(|c| c.is_whitespace()) {
        return Err(format!(
            "{key}: the Rabbit's command cannot carry that path: it holds whitespace ({}), \
             and the Rabbit splits its command on spaces",
            name_of(c)
        ));
    }
    if let Some((c, why)) = first_special(value) {
        return Err(format!(
            "{key}: the Rabbit's command cannot carry that path: the character {} is {why}, \
             and the Rabbit runs the path through bash as root",
            name_of(c)
        ));
    }
    Ok(())
}

/// Everything of `request` that the Rabbit's worker pastes into its command:
/// refused as a whole, or the options normalised to single spaces. The paths
/// are checked as the user gave them: the Rabbit's path is the Rabbit's
/// mount (set by the system) followed by the same tail.
pub fn for_rabbit(request: &mut Request) -> Result<(), String> {
    rabbit_path("source", &request.source)?;
    rabbit_path("destination", &request.destination)?;
    request.dcp_options = rabbit_options("dcp_options", &request.dcp_options)?;
    request.mpirun_options = rabbit_options("mpirun_options", &request.mpirun_options)?;
    Ok(())
}

/// `value` as exactly one bash word: unchanged when bash would take it as
/// itself, else single-quoted (a `'` inside becomes `'\''`).
pub fn quote(value: &str) -> String {
    if !value.is_empty()
        && !value.chars().any(char::is_whitespace)
        && first_special(value).is_none()
    {
        return value.to_string();
    }
    let mut out = String::with_capacity(value.len() + 2);
    out.push('\'');
    for c in value.chars() {
        if c == '\'' {
            out.push_str("'\\''");
        } else {
            out.push(c);
        }
    }
    out.push('\'');
    out
}

/// Splits option text into words by the request grammar's own quoting:
/// whitespace separates words, a double-quoted part may hold whitespace, and
/// inside quotes `\"`, `\\` and `\n` stand for `"`, `\` and a newline.
/// (`dcp_options="--label \"a b\" -v"` gives `--label`, `a b`, `-v`.)
pub fn split_options(key: &str, value: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut chars = value.chars();
    let mut word: Option<String> = None;
    while let Some(c) = chars.next() {
        if c.is_whitespace() {
            words.extend(word.take());
        } else if c == '"' {
            let w = word.get_or_insert_with(String::new);
            loop {
                match chars.next() {
                    None => return Err(format!("{key}: unterminated quote")),
                    Some('"') => break,
                    Some('\\') => match chars.next() {
                        Some('"') => w.push('"'),
                        Some('\\') => w.push('\\'),
                        Some('n') => w.push('\n'),
                        Some(other) => {
                            return Err(format!("{key}: unknown escape '\\{other}' inside quotes"))
                        }
                        None => return Err(format!("{key}: unterminated quote")),
                    },
                    Some(other) => w.push(other),
                }
            }
        } else {
            word.get_or_insert_with(String::new).push(c);
        }
    }
    words.extend(word);
    Ok(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLAIN: &[&str] = &[
        "--chunksize 64MB",
        "--mca btl self",
        "-x FOO=bar",
        "--map-by ppr:1:node",
        "--bufsize 1MB --progress 5",
        "-x LD=/opt/a:/opt/b",
        "user@host a,b +1 50% a~b a#b",
        "--label é日本",
        "",
    ];

    #[test]
    fn characters_are_named_readably() {
        assert_eq!(name_of(';'), "';'");
        assert_eq!(name_of('\''), "\"'\"");
        assert_eq!(name_of('\n'), "U+000A");
        assert_eq!(name_of('\u{1b}'), "U+001B");
    }

    #[test]
    fn plain_options_pass_unchanged() {
        for value in PLAIN {
            assert_eq!(
                rabbit_options("dcp_options", value).as_deref(),
                Ok(*value),
                "{value}"
            );
        }
        assert_eq!(
            rabbit_options("dcp_options", "  --a   b ").as_deref(),
            Ok("--a b")
        );
    }

    fn refused(value: &str, c: char) {
        let err = rabbit_options("mpirun_options", value).unwrap_err();
        assert!(err.starts_with("mpirun_options: "), "{err}");
        assert!(err.contains(&name_of(c)), "{value}: {err}");
    }

    #[test]
    fn quotes_and_backslash_are_refused() {
        for c in ['"', '\'', '`', '\\'] {
            refused(&format!("-x A{c}B"), c);
            refused(&format!("{c}"), c);
        }
    }

    #[test]
    fn operators_and_expansions_are_refused_anywhere() {
        for c in ";&|<>()$*?[]{}!".chars() {
            refused(&format!("--bufsize 1MB{c}x"), c);
            refused(&format!("{c}"), c);
            refused(&format!("a {c}b"), c);
        }
        refused("--bufsize 1MB; touch /tmp/pwned", ';');
        refused("$(id>/tmp/pwned)", '$');
        refused("-x A | sh", '|');
    }

    #[test]
    fn control_characters_are_refused() {
        for c in ['\n', '\t', '\r', '\u{1b}', '\u{7f}', '\u{85}'] {
            refused(&format!("-x{c}A"), c);
        }
    }

    #[test]
    fn tilde_and_hash_only_at_the_start_of_a_word() {
        refused("~/x", '~');
        refused("-x ~root", '~');
        refused("#comment", '#');
        refused("-v #x", '#');
        // bash expands these as assignments even as arguments.
        refused("-x FOO=~/x", '~');
        refused("-x P=/a:~/b", '~');
        assert!(rabbit_options("k", "a~ b# c~d e#f").is_ok());
    }

    #[test]
    fn paths_allow_no_whitespace_and_no_special_character() {
        assert!(rabbit_path("source", "/mnt/nnf/x/ckpt-1/a_b.c,d:e+f@g%h").is_ok());
        for path in ["/a b", "/a\tb", "/a\u{a0}b", "/a\nb"] {
            let err = rabbit_path("source", path).unwrap_err();
            assert!(err.contains("cannot carry that path"), "{err}");
        }
        for (path, c) in [
            ("/ckpt/e;touch", ';'),
            ("/lus/global/u/f&&id", '&'),
            ("/x/$(id)", '$'),
            ("/x/`id`", '`'),
            ("/x/'a'", '\''),
            ("/x/*", '*'),
        ] {
            let err = rabbit_path("destination", path).unwrap_err();
            assert!(err.starts_with("destination: "), "{err}");
            assert!(err.contains("cannot carry that path"), "{err}");
            assert!(err.contains(&name_of(c)), "{err}");
        }
    }

    #[test]
    fn the_whole_request_is_checked() {
        let mut request = Request {
            source: "/a".into(),
            destination: "/b".into(),
            dcp_options: "--chunksize  64MB".into(),
            mpirun_options: "-x FOO=bar".into(),
            ..Request::default()
        };
        for_rabbit(&mut request).unwrap();
        assert_eq!(request.dcp_options, "--chunksize 64MB");
        assert_eq!(request.mpirun_options, "-x FOO=bar");
        request.mpirun_options = "`id`".into();
        assert!(for_rabbit(&mut request)
            .unwrap_err()
            .starts_with("mpirun_options"));
    }

    /// What bash makes of `text`: its words, one per line, by `printf`.
    fn bash_words(text: &str) -> Vec<String> {
        let out = std::process::Command::new("bash")
            .arg("-c")
            .arg(format!("printf '%s\\0' {text}"))
            .output()
            .expect("bash is needed to check the quoting");
        assert!(out.status.success(), "{text}: {out:?}");
        let mut words: Vec<String> = String::from_utf8(out.stdout)
            .unwrap()
            .split('\0')
            .map(str::to_string)
            .collect();
        words.pop();
        words
    }

    #[test]
    fn quoted_values_are_one_word_to_bash() {
        for value in [
            "/plain/path",
            "/we ird;touch /tmp/pwned",
            "/a'b\"c",
            "/x/$(id)",
            "/x/`id`",
            "/new\nline",
            "-rf",
            "~",
            "#x",
            "/a*",
            "''",
            "",
            "/tab\there",
        ] {
            assert_eq!(
                bash_words(&quote(value)),
                vec![value.to_string()],
                "{value}"
            );
        }
        assert_eq!(quote("/plain/path"), "/plain/path");
        assert_eq!(quote("a b"), "'a b'");
    }

    #[test]
    fn options_split_by_the_request_grammar() {
        assert_eq!(
            split_options("k", " --label \"a b\"  -v\t\"x\\\"y\\\\z\\n\"").unwrap(),
            vec!["--label", "a b", "-v", "x\"y\\z\n"]
        );
        assert_eq!(
            split_options("k", "a\"b c\"d \"\"").unwrap(),
            vec!["ab cd", ""]
        );
        assert!(split_options("k", "").unwrap().is_empty());
        assert!(split_options("dcp_options", "\"open")
            .unwrap_err()
            .contains("dcp_options: unterminated quote"));
        assert!(split_options("k", "\"\\q\"").is_err());
    }
}
