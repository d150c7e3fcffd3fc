//! Command-variable substitution.
//!
//! A variable is `$` followed by the longest run of `[A-Z_][A-Z0-9_]*`, and
//! is replaced only when that whole name is known (upstream's `$DEVICE_NUM-1`
//! and `$DEVICE_NUM-2` are the only names with a `-<digits>` tail, taken when
//! known). Upstream (nnf-sos `pkg/var_handler/var_handler.go`) replaced plain
//! substrings, so `$DEVICE` clobbered the front of `$DEVICE_LIST`; matching
//! whole names makes the order of the variables irrelevant. An unknown
//! variable is left exactly as written (bash may still expand it).
//!
//! Two kinds of values:
//!
//! - **text** (the profile's `variableOverride`): written by administrators,
//!   pasted in as shell text, and itself expanded again, as upstream's
//!   `replaceAllNested` does, down to [`MAX_DEPTH`] levels;
//! - **values** (everything taken from the ClientMount or computed from it:
//!   `$MOUNT_PATH`, `$VG_NAME`, labels...): never expanded again, and always
//!   exactly one word of the command. A value made only of [`is_safe`]
//!   characters goes in as it is; any other value is single-quoted where the
//!   command is unquoted, and goes in unchanged inside the profile's own
//!   single or double quotes when it cannot end them. A value that would
//!   change the command's words anyway (a quote ending the profile's quotes,
//!   `$`, `` ` `` or `\` inside double quotes, anything after a backslash or
//!   inside backquotes, any control character such as a newline) is refused
//!   with an error naming the variable and where its value came from.

use std::collections::BTreeMap;

/// How deep a variable's text may refer to other variables (upstream's
/// `replaceAllNested` stops at the same depth).
pub const MAX_DEPTH: usize = 5;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    /// Shell text from the profile; expanded again.
    Text,
    /// One word from the ClientMount (or computed); never expanded again.
    Value { origin: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Var {
    content: String,
    kind: Kind,
}

/// Variables keyed by their full name, `$` included (as profiles'
/// `variableOverride` maps spell them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Vars {
    map: BTreeMap<String, Var>,
}

/// A value that cannot be pasted into a command without changing its words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{name} ({origin}) is {value:?}: {why}; refusing to run the command {command:?}")]
pub struct Refused {
    pub name: String,
    pub origin: String,
    pub value: String,
    pub why: String,
    pub command: String,
}

/// Characters that mean nothing to the shell anywhere in a word.
pub fn is_safe(c: char) -> bool {
    c.is_ascii_alphanumeric() || "_@%+=:,./-".contains(c)
}

impl Vars {
    pub fn new() -> Vars {
        Vars::default()
    }

    /// A value from the ClientMount (or computed from it); `origin` names
    /// where it came from, for error messages.
    pub fn value(&mut self, name: &str, content: impl Into<String>, origin: impl Into<String>) {
        self.map.insert(
            name.to_string(),
            Var {
                content: content.into(),
                kind: Kind::Value {
                    origin: origin.into(),
                },
            },
        );
    }

    /// Profile text (a `variableOverride` entry).
    pub fn text(&mut self, name: &str, content: impl Into<String>) {
        self.map.insert(
            name.to_string(),
            Var {
                content: content.into(),
                kind: Kind::Text,
            },
        );
    }

    /// The variable's final string as the daemon itself uses it (a VG name
    /// to look up, a device path): text expanded, values as they are.
    pub fn plain(&self, name: &str) -> Option<String> {
        let var = self.map.get(name)?;
        Some(match var.kind {
            Kind::Value { .. } => var.content.clone(),
            Kind::Text => {
                let mut out = Vec::new();
                self.resolve(&var.content, 1, &mut out);
                out.into_iter()
                    .map(|s| match s {
                        Seg::Text(t) => t,
                        Seg::Value { content, .. } => content,
                    })
                    .collect()
            }
        })
    }

    /// Split `text` into profile text and values, expanding text variables
    /// recursively. `depth` counts the levels of variable text entered.
    fn resolve(&self, text: &str, depth: usize, out: &mut Vec<Seg>) {
        let bytes = text.as_bytes();
        let mut i = 0;
        let mut copied = 0;
        let push_text = |out: &mut Vec<Seg>, s: &str| {
            if s.is_empty() {
                return;
            }
            if let Some(Seg::Text(t)) = out.last_mut() {
                t.push_str(s);
            } else {
                out.push(Seg::Text(s.to_string()));
            }
        };
        while i < bytes.len() {
            if bytes[i] != b'$' {
                i += 1;
                continue;
            }
            let start = i + 1;
            let mut end = start;
            while end < bytes.len() {
                let c = bytes[end];
                let ok = c == b'_' || c.is_ascii_uppercase() || (end > start && c.is_ascii_digit());
                if !ok {
                    break;
                }
                end += 1;
            }
            if end == start {
                i += 1;
                continue;
            }
            // `$DEVICE_NUM-1`: a known name with a `-<digits>` tail.
            if bytes.get(end) == Some(&b'-') {
                let mut tail = end + 1;
                while tail < bytes.len() && bytes[tail].is_ascii_digit() {
                    tail += 1;
                }
                if tail > end + 1 && self.map.contains_key(&text[i..tail]) {
                    end = tail;
                }
            }
            let name = &text[i..end];
            match self.map.get(name) {
                Some(var) if depth <= MAX_DEPTH => {
                    push_text(out, &text[copied..i]);
                    match &var.kind {
                        Kind::Text => self.resolve(&var.content, depth + 1, out),
                        Kind::Value { origin } => out.push(Seg::Value {
                            name: name.to_string(),
                            origin: origin.clone(),
                            content: var.content.clone(),
                        }),
                    }
                    copied = end;
                }
                _ => {}
            }
            i = end;
        }
        push_text(out, &text[copied..]);
    }

    /// Substitute every known variable of `text` (a command line).
    pub fn expand(&self, text: &str) -> Result<String, Refused> {
        let mut segs = Vec::new();
        self.resolve(text, 0, &mut segs);
        let mut lexer = Lexer::default();
        let mut out = String::with_capacity(text.len());
        for seg in segs {
            match seg {
                Seg::Text(t) => {
                    for c in t.chars() {
                        lexer.feed(c);
                    }
                    out.push_str(&t);
                }
                Seg::Value {
                    name,
                    origin,
                    content,
                } => {
                    let refuse = |why: &str| Refused {
                        name: name.clone(),
                        origin: origin.clone(),
                        value: content.clone(),
                        why: why.to_string(),
                        command: text.to_string(),
                    };
                    if content.chars().any(|c| c.is_control()) {
                        return Err(refuse("it holds a control character (such as a newline)"));
                    }
                    let safe = content.chars().all(is_safe);
                    match lexer.context() {
                        _ if content.is_empty() && lexer.escaped => {}
                        _ if safe && !content.is_empty() => {
                            // Nothing in it the shell reads; a pending
                            // backslash only escapes its first character.
                            lexer.escaped = false;
                            out.push_str(&content);
                        }
                        Ctx::Unquoted if !lexer.escaped => out.push_str(&shell_quote(&content)),
                        Ctx::Single if !content.contains('\'') => out.push_str(&content),
                        Ctx::Single => {
                            return Err(refuse(
                                "its ' would end the single quotes around it in the profile",
                            ))
                        }
                        Ctx::Double if !lexer.escaped && !content.contains(['"', '$', '`', '\\']) => {
                            out.push_str(&content)
                        }
                        Ctx::Double => {
                            return Err(refuse(
                                "inside the profile's double quotes its \", $, ` or \\ would be read by the shell",
                            ))
                        }
                        Ctx::Comment => out.push_str(&content),
                        _ if content.is_empty() => {}
                        _ => {
                            return Err(refuse(
                                "the profile places it where quoting cannot keep it one word (after a backslash, inside backquotes or $'...')",
                            ))
                        }
                    }
                }
            }
        }
        Ok(out)
    }
}

/// Single-quote `s` for bash (`'` becomes `'\''`); the empty string is `''`.
pub fn shell_quote(s: &str) -> String {
    let mut q = String::with_capacity(s.len() + 2);
    q.push('\'');
    for c in s.chars() {
        if c == '\'' {
            q.push_str("'\\''");
        } else {
            q.push(c);
        }
    }
    q.push('\'');
    q
}

#[derive(Debug)]
enum Seg {
    Text(String),
    Value {
        name: String,
        origin: String,
        content: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ctx {
    /// Plain shell words (the top level, or inside `$(...)`).
    Unquoted,
    Single,
    Double,
    AnsiC,
    Backquote,
    Comment,
}

/// Just enough of bash's quoting rules to know, at each point of a command
/// line, whether a pasted word would be read unquoted, inside '...', inside
/// "..." or somewhere else.
#[derive(Debug)]
struct Lexer {
    /// Innermost last; `(ctx, nested, parens)`: `nested` marks an unquoted
    /// frame opened by `$(`, `parens` the plain `(` open inside it.
    stack: Vec<(Ctx, bool, u32)>,
    escaped: bool,
    dollar: bool,
    /// The last character ends a word (a `#` after it starts a comment).
    boundary: bool,
}

impl Default for Lexer {
    fn default() -> Lexer {
        Lexer {
            stack: vec![(Ctx::Unquoted, false, 0)],
            escaped: false,
            dollar: false,
            boundary: true,
        }
    }
}

impl Lexer {
    fn context(&self) -> Ctx {
        self.stack.last().map(|f| f.0).unwrap_or(Ctx::Unquoted)
    }

    fn feed(&mut self, c: char) {
        let dollar = std::mem::replace(&mut self.dollar, false);
        let boundary = std::mem::replace(&mut self.boundary, false);
        if self.escaped {
            self.escaped = false;
            return;
        }
        let top = self.stack.len() - 1;
        match self.context() {
            Ctx::Unquoted => match c {
                '\\' => self.escaped = true,
                '\'' if dollar => self.stack.push((Ctx::AnsiC, false, 0)),
                '\'' => self.stack.push((Ctx::Single, false, 0)),
                '"' => self.stack.push((Ctx::Double, false, 0)),
                '`' => self.stack.push((Ctx::Backquote, false, 0)),
                '(' if dollar => self.stack.push((Ctx::Unquoted, true, 0)),
                '(' => {
                    self.stack[top].2 += 1;
                    self.boundary = true;
                }
                ')' => {
                    let (_, nested, parens) = self.stack[top];
                    if parens > 0 {
                        self.stack[top].2 -= 1;
                    } else if nested {
                        self.stack.pop();
                    }
                    self.boundary = true;
                }
                '$' => self.dollar = true,
                '#' if boundary => self.stack.push((Ctx::Comment, false, 0)),
                c if c.is_whitespace() || ";&|<>".contains(c) => self.boundary = true,
                _ => {}
            },
            Ctx::Single => {
                if c == '\'' {
                    self.stack.pop();
                }
            }
            Ctx::AnsiC => match c {
                '\\' => self.escaped = true,
                '\'' => {
                    self.stack.pop();
                }
                _ => {}
            },
            Ctx::Double => match c {
                '\\' => self.escaped = true,
                '"' => {
                    self.stack.pop();
                }
                '`' => self.stack.push((Ctx::Backquote, false, 0)),
                '(' if dollar => self.stack.push((Ctx::Unquoted, true, 0)),
                '$' => self.dollar = true,
                _ => {}
            },
            Ctx::Backquote => match c {
                '\\' => self.escaped = true,
                '`' => {
                    self.stack.pop();
                }
                _ => {}
            },
            Ctx::Comment => {
                if c == '\n' {
                    self.stack.pop();
                    self.boundary = true;
                }
            }
        }
        if self.stack.is_empty() {
            self.stack.push((Ctx::Unquoted, false, 0));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(pairs: &[(&str, &str)]) -> Vars {
        let mut v = Vars::new();
        for (k, val) in pairs {
            v.value(k, *val, "test");
        }
        v
    }

    fn ok(v: &Vars, text: &str) -> String {
        v.expand(text).unwrap()
    }

    #[test]
    fn whole_names_only() {
        let mut v = values(&[("$DEVICE", "/dev/x")]);
        v.text("$DEVICE_LIST", "/dev/a /dev/b");
        assert_eq!(ok(&v, "$DEVICE $DEVICE_LIST"), "/dev/x /dev/a /dev/b");
        let v = values(&[("$DEVICE", "/dev/x")]);
        assert_eq!(ok(&v, "$DEVICE_LIST $DEVICE"), "$DEVICE_LIST /dev/x");
    }

    #[test]
    fn adjacent_and_unknown() {
        let v = values(&[("$VG_NAME", "vg"), ("$LV_NAME", "lv")]);
        assert_eq!(ok(&v, "$VG_NAME/$LV_NAME"), "vg/lv");
        assert_eq!(ok(&v, "$NOPE $ $1 $lower $VG_NAME"), "$NOPE $ $1 $lower vg");
        assert_eq!(ok(&v, "a$VG_NAME-b"), "avg-b");
        assert_eq!(ok(&v, ""), "");
        assert_eq!(ok(&v, "$"), "$");
        assert_eq!(ok(&v, "é$VG_NAMEé"), "évgé");
        assert_eq!(ok(&v, "é$VG_NAME é"), "évg é");
    }

    #[test]
    fn device_num_tails() {
        let v = values(&[
            ("$DEVICE_NUM", "4"),
            ("$DEVICE_NUM-1", "3"),
            ("$DEVICE_NUM-2", "2"),
        ]);
        assert_eq!(
            ok(&v, "$DEVICE_NUM $DEVICE_NUM-1 $DEVICE_NUM-2 $DEVICE_NUM-3"),
            "4 3 2 4-3"
        );
    }

    #[test]
    fn nested_text_expands_to_depth_five() {
        let mut v = values(&[("$VG_NAME", "vg1")]);
        v.text("$A", "a:$B");
        v.text("$B", "b:$VG_NAME");
        assert_eq!(ok(&v, "x $A"), "x a:b:vg1");
        // A chain of seven: six are replaced, as upstream's six passes do.
        let mut v = Vars::new();
        for (k, next) in [
            ("$L_A", "$L_B"),
            ("$L_B", "$L_C"),
            ("$L_C", "$L_D"),
            ("$L_D", "$L_E"),
            ("$L_E", "$L_F"),
            ("$L_F", "$L_G"),
            ("$L_G", "end"),
        ] {
            v.text(k, next);
        }
        assert_eq!(ok(&v, "$L_A"), "$L_G");
        assert_eq!(ok(&v, "$L_B"), "end");
        // A cycle stops at the depth limit instead of looping.
        let mut v = Vars::new();
        v.text("$SELF", "[$SELF]");
        assert_eq!(ok(&v, "$SELF"), "[[[[[[$SELF]]]]]]");
    }

    #[test]
    fn values_are_never_expanded_again() {
        let mut v = values(&[("$MOUNT_PATH", "/mnt/$VG_NAME")]);
        v.value("$VG_NAME", "vg", "test");
        assert_eq!(ok(&v, "echo $MOUNT_PATH"), "echo '/mnt/$VG_NAME'");
    }

    #[test]
    fn hostile_values_stay_one_word_unquoted() {
        for hostile in [
            "/mnt/a b",
            "/mnt/a;touch /tmp/x",
            "/mnt/$(id)",
            "/mnt/`id`",
            "/mnt/a'b",
            "/mnt/a\"b",
            "/mnt/*",
            "",
        ] {
            let v = values(&[("$MOUNT_PATH", hostile)]);
            let cmd = ok(&v, "printf '%s\\n' $MOUNT_PATH");
            let out = std::process::Command::new("bash")
                .arg("-c")
                .arg(&cmd)
                .output()
                .unwrap();
            assert_eq!(
                String::from_utf8_lossy(&out.stdout),
                format!("{hostile}\n"),
                "{cmd}"
            );
        }
    }

    #[test]
    fn inside_the_profiles_quotes() {
        let v = values(&[("$MOUNT_PATH", "/mnt/a b;c")]);
        assert_eq!(ok(&v, "echo '$MOUNT_PATH'"), "echo '/mnt/a b;c'");
        assert_eq!(ok(&v, "echo \"x $MOUNT_PATH\""), "echo \"x /mnt/a b;c\"");
        // Inside $(...) within double quotes the words are plain again.
        assert_eq!(
            ok(&v, "echo \"$(basename $MOUNT_PATH)\""),
            "echo \"$(basename '/mnt/a b;c')\""
        );
        assert_eq!(
            ok(&v, "echo x # it's $MOUNT_PATH"),
            "echo x # it's /mnt/a b;c"
        );
        let e = values(&[("$MOUNT_PATH", "/a'b")])
            .expand("echo '$MOUNT_PATH'")
            .unwrap_err();
        assert!(e.to_string().contains("$MOUNT_PATH"), "{e}");
        for bad in ["/a\"b", "/a$(id)", "/a`id`", "/a\\b"] {
            let e = values(&[("$MOUNT_PATH", bad)])
                .expand("echo \"$MOUNT_PATH\"")
                .unwrap_err();
            assert!(e.why.contains("double quotes"), "{e}");
        }
        let e = values(&[("$MOUNT_PATH", "/a b")])
            .expand("echo `ls $MOUNT_PATH`")
            .unwrap_err();
        assert!(e.why.contains("backquotes"), "{e}");
        let e = values(&[("$MOUNT_PATH", "/a b")])
            .expand("echo \\$MOUNT_PATH")
            .unwrap_err();
        assert!(e.why.contains("backslash"), "{e}");
    }

    #[test]
    fn control_characters_are_refused_everywhere() {
        for text in ["echo $JOBID", "echo '$JOBID'", "echo \"$JOBID\""] {
            let mut v = Vars::new();
            v.value("$JOBID", "1\ntouch /tmp/x", "label nnf.cray.hpe.com/job_id");
            let e = v.expand(text).unwrap_err();
            assert_eq!(e.name, "$JOBID");
            assert!(
                e.to_string().contains("label nnf.cray.hpe.com/job_id"),
                "{e}"
            );
            assert!(e.why.contains("control character"), "{e}");
        }
    }

    #[test]
    fn plain_values_for_the_daemon() {
        let mut v = values(&[("$JOBID", "7")]);
        v.text("$VG_NAME", "vg_$JOBID");
        assert_eq!(v.plain("$VG_NAME").as_deref(), Some("vg_7"));
        assert_eq!(v.plain("$JOBID").as_deref(), Some("7"));
        assert_eq!(v.plain("$NONE"), None);
    }
}
