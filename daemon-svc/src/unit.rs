//! The unit file text: the packaged template with its `ExecStart=` line
//! rewritten, quoted the way systemd unquotes.

/// The unit text: `template` with its `ExecStart=` line replaced by the
/// program and `flags`, each quoted for systemd only where needed.
pub fn render_unit(template: &str, exe: &str, flags: &[String]) -> String {
    let mut exec = String::from("ExecStart=");
    exec.push_str(&systemd_quote(exe));
    for f in flags {
        exec.push(' ');
        exec.push_str(&systemd_quote(f));
    }
    let mut out = String::with_capacity(template.len() + exec.len());
    let mut replaced = false;
    for line in template.split_inclusive('\n') {
        if !replaced && line.starts_with("ExecStart=") {
            out.push_str(&exec);
            if line.ends_with('\n') {
                out.push('\n');
            }
            replaced = true;
        } else {
            out.push_str(line);
        }
    }
    // The templates are ours and tested to hold exactly one ExecStart= line.
    assert!(replaced, "unit template has no ExecStart= line");
    out
}

/// Quote one ExecStart word per systemd.service(5) "Command lines":
/// words split on whitespace, `"..."`/`'...'` group a whole word, C escapes
/// are processed, `%` starts a specifier and `$` a variable everywhere.
/// Plain words (the usual `--flag=value`) are returned untouched.
pub fn systemd_quote(word: &str) -> String {
    // `%` and `$` are expanded even inside quotes; doubling is the only escape.
    let escaped = word.replace('%', "%%").replace('$', "$$");
    let needs_quotes = escaped.is_empty()
        // A lone ";" used to separate commands.
        || escaped == ";"
        || escaped
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '"' | '\'' | '\\'));
    if !needs_quotes {
        return escaped;
    }
    let mut out = String::with_capacity(escaped.len() + 2);
    out.push('"');
    for c in escaped.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => {
                // Any other control byte: \xNN keeps the unit on one line.
                let mut buf = [0u8; 4];
                for b in c.encode_utf8(&mut buf).bytes() {
                    out.push_str(&format!("\\x{b:02x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
