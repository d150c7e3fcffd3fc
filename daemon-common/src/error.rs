//! How both daemons print an error: once, with every cause behind it.

use std::fmt;

/// `error: cause: cause …`, for the last line a daemon prints and for log
/// fields, so a typed error keeps its `#[source]` chain and the reader
/// still sees all of it.
pub struct Causes<'a>(pub &'a (dyn std::error::Error + 'static));

impl fmt::Display for Causes<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut last = self.0.to_string();
        let mut cause = self.0.source();
        while let Some(c) = cause {
            let text = c.to_string();
            // An error that already spells its cause out in its own message
            // (as `{source}` in a thiserror format) is not repeated.
            if !last.ends_with(&text) {
                write!(f, ": {text}")?;
            }
            last = text;
            cause = c.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("cannot start")]
        Start(#[source] std::io::Error),
        #[error("cannot open: {0}")]
        Open(#[source] std::io::Error),
    }

    #[test]
    fn every_cause_once() {
        let io = || std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        assert_eq!(
            Causes(&Outer::Start(io())).to_string(),
            "cannot start: no such file"
        );
        assert_eq!(
            Causes(&Outer::Open(io())).to_string(),
            "cannot open: no such file"
        );
    }
}
