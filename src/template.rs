//! A small HTML template: the page's markup lives in `.html` files next to the code
//! (`src/status/`), with `{{name}}` where a value goes.
//!
//! Escaping is by type, not by care: a value is either [`Value::Text`], escaped when it is put
//! in, or [`Value::Html`], and the only ways to make an [`Html`] are rendering a template,
//! including a `&'static str` written into ncps, and joining other `Html`s. So text from
//! outside (upstream URLs and errors, store path names, the Host header) cannot become markup
//! by forgetting a call. Harmonia's `template.rs` is the model (`include_str!` and
//! placeholders); unlike its string replacement, this reads the template once, left to right,
//! so a value that contains `{{…}}` is never itself expanded. About 60 lines; a template
//! engine crate would be most of the status page's code.

use std::fmt::Write as _;

/// Markup that ncps wrote (from a template or a literal), safe to put in a page as is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Html(String);

impl Html {
    /// A literal of ncps's own: it cannot carry outside input.
    pub fn from_static(s: &'static str) -> Html {
        Html(s.to_string())
    }

    pub fn join(parts: impl IntoIterator<Item = Html>) -> Html {
        Html(parts.into_iter().map(|h| h.0).collect())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

/// What a placeholder is replaced by.
pub enum Value {
    /// Escaped for element content and quoted attribute values.
    Text(String),
    Html(Html),
}

impl From<String> for Value {
    fn from(s: String) -> Value {
        Value::Text(s)
    }
}

impl From<&str> for Value {
    fn from(s: &str) -> Value {
        Value::Text(s.to_string())
    }
}

impl From<Html> for Value {
    fn from(h: Html) -> Value {
        Value::Html(h)
    }
}

/// Fills `template`'s `{{name}}` placeholders from `vars`. A name without a value renders as
/// nothing (the tests check every template's names are given, see [`placeholders`]); a `{{`
/// without its `}}` is copied as it is.
pub fn render(template: &'static str, vars: &[(&str, Value)]) -> Html {
    let mut out = String::with_capacity(template.len() * 2);
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else {
            out.push_str(&rest[start..]);
            rest = "";
            break;
        };
        let name = after[..end].trim();
        match vars.iter().find(|(n, _)| *n == name).map(|(_, v)| v) {
            Some(Value::Text(t)) => escape_into(&mut out, t),
            Some(Value::Html(h)) => out.push_str(&h.0),
            None => {
                #[cfg(test)]
                MISSING.with(|m| m.borrow_mut().push(name.to_string()));
            }
        }
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    Html(out)
}

#[cfg(test)]
thread_local! {
    /// Placeholders rendered without a value on this thread, for tests to check.
    static MISSING: std::cell::RefCell<Vec<String>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The placeholders this thread rendered without a value since the last call (tests only).
#[cfg(test)]
pub fn take_missing() -> Vec<String> {
    MISSING.with(|m| std::mem::take(&mut *m.borrow_mut()))
}

/// The placeholder names in `template`, in order.
pub fn placeholders(template: &str) -> Vec<&str> {
    let mut names = Vec::new();
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else { break };
        names.push(after[..end].trim());
        rest = &after[end + 2..];
    }
    names
}

/// Escapes text for HTML element content and quoted attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    escape_into(&mut out, s);
    out
}

fn escape_into(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => {
                let _ = out.write_char(c);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped_and_html_is_not() {
        let inner = render("<b>{{x}}</b>", &[("x", "<i>&\"'".into())]);
        assert_eq!(inner.as_str(), "<b>&lt;i&gt;&amp;&quot;&#39;</b>");
        let outer = render("<p title=\"{{t}}\">{{ body }}</p>", &[("t", "\"><script>".into()), ("body", inner.into())]);
        assert_eq!(outer.as_str(), "<p title=\"&quot;&gt;&lt;script&gt;\"><b>&lt;i&gt;&amp;&quot;&#39;</b></p>");
    }

    #[test]
    fn a_value_that_looks_like_a_placeholder_is_not_expanded() {
        let h = render("{{a}}{{b}}", &[("a", "{{b}}".into()), ("b", "B".into())]);
        assert_eq!(h.as_str(), "{{b}}B");
    }

    #[test]
    fn missing_names_render_empty_and_a_lone_brace_pair_is_kept() {
        take_missing();
        assert_eq!(render("a{{nope}}b", &[]).as_str(), "ab");
        assert_eq!(take_missing(), vec!["nope"]);
        assert_eq!(render("a{{open", &[]).as_str(), "a{{open");
        assert_eq!(render("}} {", &[]).as_str(), "}} {");
        assert_eq!(placeholders("x{{ a }}y{{b}}{{c"), vec!["a", "b"]);
    }
}
