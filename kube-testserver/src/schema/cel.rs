//! The CEL subset of the NNF CRDs' `x-kubernetes-validations` rules.

use serde_json::Value;

pub(crate) fn eval(expr: &str, this: &Value) -> Option<bool> {
    let toks = lex(expr)?;
    let mut p = Parser { toks, pos: 0, this };
    let v = p.or()?;
    (p.pos == p.toks.len()).then_some(v)
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    Int(i64),
    Sym(&'static str),
}

fn lex(s: &str) -> Option<Vec<Tok>> {
    let b: Vec<char> = s.chars().collect();
    let mut i = 0;
    let mut out = Vec::new();
    while i < b.len() {
        let c = b[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '"' || c == '\'' {
            let mut st = String::new();
            i += 1;
            while i < b.len() && b[i] != c {
                if b[i] == '\\' && i + 1 < b.len() {
                    i += 1;
                }
                st.push(b[i]);
                i += 1;
            }
            if i >= b.len() {
                return None;
            }
            i += 1;
            out.push(Tok::Str(st));
        } else if c.is_ascii_digit() {
            let start = i;
            while i < b.len() && b[i].is_ascii_digit() {
                i += 1;
            }
            out.push(Tok::Int(
                b[start..i].iter().collect::<String>().parse().ok()?,
            ));
        } else if c.is_alphabetic() || c == '_' {
            let start = i;
            while i < b.len() && (b[i].is_alphanumeric() || b[i] == '_') {
                i += 1;
            }
            out.push(Tok::Ident(b[start..i].iter().collect()));
        } else {
            let two: String = b[i..(i + 2).min(b.len())].iter().collect();
            let sym = ["&&", "||", "==", "!=", "<=", ">="]
                .into_iter()
                .find(|s| *s == two);
            if let Some(sym) = sym {
                out.push(Tok::Sym(sym));
                i += 2;
            } else {
                let one = ["!", "(", ")", ".", ",", "<", ">"]
                    .into_iter()
                    .find(|s| s.starts_with(c))?;
                out.push(Tok::Sym(one));
                i += 1;
            }
        }
    }
    Some(out)
}

struct Parser<'a> {
    toks: Vec<Tok>,
    pos: usize,
    this: &'a Value,
}

impl Parser<'_> {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos)
    }

    fn eat(&mut self, t: &Tok) -> bool {
        if self.peek() == Some(t) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn or(&mut self) -> Option<bool> {
        let mut v = self.and()?;
        while self.eat(&Tok::Sym("||")) {
            let r = self.and()?;
            v = v || r;
        }
        Some(v)
    }

    fn and(&mut self) -> Option<bool> {
        let mut v = self.unary()?;
        while self.eat(&Tok::Sym("&&")) {
            let r = self.unary()?;
            v = v && r;
        }
        Some(v)
    }

    fn unary(&mut self) -> Option<bool> {
        if self.eat(&Tok::Sym("!")) {
            return Some(!self.unary()?);
        }
        self.primary()
    }

    fn string_arg(&mut self) -> Option<String> {
        if !self.eat(&Tok::Sym("(")) {
            return None;
        }
        let Some(Tok::Str(s)) = self.peek().cloned() else {
            return None;
        };
        self.pos += 1;
        self.eat(&Tok::Sym(")")).then_some(s)
    }

    fn primary(&mut self) -> Option<bool> {
        match self.peek().cloned()? {
            Tok::Sym("(") => {
                self.pos += 1;
                let v = self.or()?;
                self.eat(&Tok::Sym(")")).then_some(v)
            }
            Tok::Ident(id) if id == "true" || id == "false" => {
                self.pos += 1;
                Some(id == "true")
            }
            Tok::Ident(id) if id == "self" => {
                self.pos += 1;
                if !self.eat(&Tok::Sym(".")) {
                    return None;
                }
                let Some(Tok::Ident(m)) = self.peek().cloned() else {
                    return None;
                };
                self.pos += 1;
                let arg = self.string_arg()?;
                let s = self.this.as_str()?;
                match m.as_str() {
                    "contains" => Some(s.contains(&arg)),
                    "startsWith" => Some(s.starts_with(&arg)),
                    "endsWith" => Some(s.ends_with(&arg)),
                    _ => None,
                }
            }
            Tok::Ident(id) if id == "size" => {
                self.pos += 1;
                let ok = self.eat(&Tok::Sym("("))
                    && self.eat(&Tok::Ident("self".into()))
                    && self.eat(&Tok::Sym(")"));
                if !ok {
                    return None;
                }
                let n = match self.this {
                    Value::String(s) => s.chars().count(),
                    Value::Array(a) => a.len(),
                    Value::Object(o) => o.len(),
                    _ => return None,
                } as i64;
                let Some(Tok::Sym(op)) = self.peek().cloned() else {
                    return None;
                };
                self.pos += 1;
                let Some(Tok::Int(k)) = self.peek().cloned() else {
                    return None;
                };
                self.pos += 1;
                match op {
                    "==" => Some(n == k),
                    "!=" => Some(n != k),
                    "<" => Some(n < k),
                    "<=" => Some(n <= k),
                    ">" => Some(n > k),
                    ">=" => Some(n >= k),
                    _ => None,
                }
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::eval;
    use serde_json::json;

    #[test]
    fn evaluates_the_nnf_rules() {
        let rule =
            r#"!self.contains("setpriv") || (self.contains("$UID") && self.contains("$GID"))"#;
        assert_eq!(
            eval(rule, &json!("setpriv --euid $UID --egid $GID")),
            Some(true)
        );
        assert_eq!(eval(rule, &json!("setpriv --euid $UID")), Some(false));
        assert_eq!(eval(rule, &json!("true")), Some(true));
        assert_eq!(eval("size(self) <= 3", &json!("abcd")), Some(false));
        assert_eq!(eval("self.matches('x')", &json!("x")), None);
        assert_eq!(eval("self.all(x, x > 1)", &json!([1])), None);
    }
}
