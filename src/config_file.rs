//! The config file (`--config`, `NCPS_CONFIG_FILE`), as the Go ncps reads it: TOML, YAML or
//! JSON, chosen by the file's extension, holding the settings under dotted keys
//! (`cache.hostname`, `cache.upstream.urls`, ...) written as nested tables, or as literal
//! dotted keys, or both.
//!
//! This module only turns the text into a flat list of `(dotted key, value)`; which keys
//! exist and what their values mean is [`crate::config`]'s business (the keys are a column of
//! its flag table, so the file, the flags and `--help` cannot drift apart). No I/O: the file
//! is read at the edge (main.rs) and its text handed here.
//!
//! Three parsers, one tree: each format is converted into [`Node`] and flattened the same
//! way, so a setting means the same whatever the format. The crates are `toml`, `serde_json`
//! and `yaml-rust2` (pure Rust, YAML 1.2, maintained); together they add 0.30 MB (7%) to the
//! release binary (DESIGN.md, "Config file").

use std::fmt;

/// The formats, by extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Toml,
    Yaml,
    Json,
}

impl Format {
    /// `.toml`, `.yaml`/`.yml`, `.json` (any case); anything else is None.
    pub fn from_path(path: &str) -> Option<Format> {
        let ext = path.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase())?;
        match ext.as_str() {
            "toml" => Some(Format::Toml),
            "yaml" | "yml" => Some(Format::Yaml),
            "json" => Some(Format::Json),
            _ => None,
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Toml => "TOML",
            Format::Yaml => "YAML",
            Format::Json => "JSON",
        })
    }
}

/// What a setting holds once flattened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Leaf {
    /// `null`, `~`, or a YAML key with nothing after it: the setting is not set.
    Null,
    /// A string, number or boolean, as text (`true`, `64`, `1.5`).
    Scalar(String),
    /// A list of scalars.
    List(Vec<String>),
}

/// Why a config file could not be read into settings.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FileError {
    /// The text is not valid in its format.
    Syntax { format: Format, message: String },
    /// A YAML file with more than one document.
    SeveralDocuments,
    /// The top level is not a table.
    NotATable,
    /// A key that is not a string (or a YAML scalar).
    BadKey { at: String },
    /// A list holding tables or lists, under `key`.
    NestedList { key: String },
}

impl fmt::Display for FileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FileError::Syntax { format, message } => write!(f, "not valid {format}: {message}"),
            FileError::SeveralDocuments => f.write_str("more than one YAML document"),
            FileError::NotATable => f.write_str("the top level must be a table of settings"),
            FileError::BadKey { at } if at.is_empty() => f.write_str("a key that is not a string"),
            FileError::BadKey { at } => write!(f, "{at}: a key that is not a string"),
            FileError::NestedList { key } => {
                write!(f, "{key}: a list may hold only strings, numbers and booleans")
            }
        }
    }
}

impl std::error::Error for FileError {}

/// The common tree the three formats are read into.
#[derive(Debug)]
enum Node {
    Null,
    Scalar(String),
    Seq(Vec<Node>),
    Map(Vec<(String, Node)>),
}

/// Parses `text` as `format` and flattens it into `(dotted key, leaf)` pairs, in the file's
/// order where the format keeps one. Tables nest: `cache: {upstream: {urls: [..]}}`,
/// `[cache.upstream] urls = [..]` and `"cache.upstream.urls": [..]` all give the key
/// `cache.upstream.urls`. An empty file, or one holding only comments, gives no settings.
pub fn parse(format: Format, text: &str) -> Result<Vec<(String, Leaf)>, FileError> {
    let root = match format {
        Format::Toml => from_toml(text)?,
        Format::Yaml => from_yaml(text)?,
        Format::Json => from_json(text)?,
    };
    let mut out = Vec::new();
    match root {
        Node::Null => {}
        Node::Map(entries) => flatten("", entries, &mut out)?,
        _ => return Err(FileError::NotATable),
    }
    Ok(out)
}

fn flatten(prefix: &str, entries: Vec<(String, Node)>, out: &mut Vec<(String, Leaf)>) -> Result<(), FileError> {
    for (k, v) in entries {
        let key = if prefix.is_empty() { k } else { format!("{prefix}.{k}") };
        match v {
            Node::Null => out.push((key, Leaf::Null)),
            Node::Scalar(s) => out.push((key, Leaf::Scalar(s))),
            Node::Seq(items) => {
                let mut list = Vec::with_capacity(items.len());
                for item in items {
                    match item {
                        Node::Scalar(s) => list.push(s),
                        _ => return Err(FileError::NestedList { key }),
                    }
                }
                out.push((key, Leaf::List(list)));
            }
            Node::Map(inner) => flatten(&key, inner, out)?,
        }
    }
    Ok(())
}

fn from_toml(text: &str) -> Result<Node, FileError> {
    let table: toml::Table =
        text.parse().map_err(|e: toml::de::Error| FileError::Syntax { format: Format::Toml, message: one_line(&e.to_string()) })?;
    fn node(v: toml::Value) -> Node {
        match v {
            toml::Value::String(s) => Node::Scalar(s),
            toml::Value::Integer(i) => Node::Scalar(i.to_string()),
            toml::Value::Float(f) => Node::Scalar(f.to_string()),
            toml::Value::Boolean(b) => Node::Scalar(b.to_string()),
            toml::Value::Datetime(d) => Node::Scalar(d.to_string()),
            toml::Value::Array(a) => Node::Seq(a.into_iter().map(node).collect()),
            toml::Value::Table(t) => Node::Map(t.into_iter().map(|(k, v)| (k, node(v))).collect()),
        }
    }
    Ok(Node::Map(table.into_iter().map(|(k, v)| (k, node(v))).collect()))
}

fn from_json(text: &str) -> Result<Node, FileError> {
    if text.trim().is_empty() {
        return Ok(Node::Null);
    }
    let value: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| FileError::Syntax { format: Format::Json, message: e.to_string() })?;
    fn node(v: serde_json::Value) -> Node {
        match v {
            serde_json::Value::Null => Node::Null,
            serde_json::Value::Bool(b) => Node::Scalar(b.to_string()),
            serde_json::Value::Number(n) => Node::Scalar(n.to_string()),
            serde_json::Value::String(s) => Node::Scalar(s),
            serde_json::Value::Array(a) => Node::Seq(a.into_iter().map(node).collect()),
            serde_json::Value::Object(o) => Node::Map(o.into_iter().map(|(k, v)| (k, node(v))).collect()),
        }
    }
    Ok(node(value))
}

fn from_yaml(text: &str) -> Result<Node, FileError> {
    use yaml_rust2::Yaml;
    let mut docs = yaml_rust2::YamlLoader::load_from_str(text)
        .map_err(|e| FileError::Syntax { format: Format::Yaml, message: e.to_string() })?;
    if docs.len() > 1 {
        return Err(FileError::SeveralDocuments);
    }
    let Some(doc) = docs.pop() else { return Ok(Node::Null) };
    fn scalar(y: &Yaml) -> Option<String> {
        match y {
            Yaml::String(s) | Yaml::Real(s) => Some(s.clone()),
            Yaml::Integer(i) => Some(i.to_string()),
            Yaml::Boolean(b) => Some(b.to_string()),
            _ => None,
        }
    }
    fn node(y: Yaml, at: &str) -> Result<Node, FileError> {
        Ok(match y {
            Yaml::Null | Yaml::BadValue | Yaml::Alias(_) => Node::Null,
            Yaml::Array(a) => Node::Seq(a.into_iter().map(|v| node(v, at)).collect::<Result<_, _>>()?),
            Yaml::Hash(h) => {
                let mut entries = Vec::with_capacity(h.len());
                for (k, v) in h {
                    let k = scalar(&k).ok_or_else(|| FileError::BadKey { at: at.to_string() })?;
                    let here = if at.is_empty() { k.clone() } else { format!("{at}.{k}") };
                    entries.push((k, node(v, &here)?));
                }
                Node::Map(entries)
            }
            other => Node::Scalar(scalar(&other).unwrap_or_default()),
        })
    }
    node(doc, "")
}

/// toml's messages quote the line with a caret under it; one line reads better in a log.
fn one_line(message: &str) -> String {
    message.split('\n').map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('|') && !l.chars().all(|c| c == '^' || c == ' ')).collect::<Vec<_>>().join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &str) -> Leaf {
        Leaf::Scalar(v.to_string())
    }

    #[test]
    fn the_format_comes_from_the_extension() {
        assert_eq!(Format::from_path("/etc/ncps/config.yaml"), Some(Format::Yaml));
        assert_eq!(Format::from_path("c.YML"), Some(Format::Yaml));
        assert_eq!(Format::from_path("c.toml"), Some(Format::Toml));
        assert_eq!(Format::from_path("c.json"), Some(Format::Json));
        assert_eq!(Format::from_path("c.ini"), None);
        assert_eq!(Format::from_path("config"), None);
    }

    #[test]
    fn nested_tables_and_dotted_keys_flatten_to_the_same_keys_in_each_format() {
        let yaml = "cache:\n  hostname: h\n  upstream:\n    urls:\n      - http://a\n      - http://b\n\"server.addr\": \":1\"\n";
        let toml = "\"server.addr\" = \":1\"\n[cache]\nhostname = \"h\"\n[cache.upstream]\nurls = [\"http://a\", \"http://b\"]\n";
        let json = r#"{"cache": {"hostname": "h", "upstream": {"urls": ["http://a", "http://b"]}}, "server.addr": ":1"}"#;
        let want = [
            ("cache.hostname".to_string(), s("h")),
            ("cache.upstream.urls".to_string(), Leaf::List(vec!["http://a".into(), "http://b".into()])),
            ("server.addr".to_string(), s(":1")),
        ];
        for (format, text) in [(Format::Yaml, yaml), (Format::Toml, toml), (Format::Json, json)] {
            let mut got = parse(format, text).unwrap();
            got.sort_by(|a, b| a.0.cmp(&b.0));
            assert_eq!(got, want, "{format}");
        }
    }

    #[test]
    fn numbers_and_booleans_become_their_text_and_null_is_kept_as_unset() {
        let got = parse(Format::Yaml, "a: 64\nb: true\nc: 1.5\nd:\ne: ~\n").unwrap();
        assert_eq!(got, [("a".into(), s("64")), ("b".into(), s("true")), ("c".into(), s("1.5")), ("d".into(), Leaf::Null), ("e".into(), Leaf::Null)]);
        let got = parse(Format::Json, r#"{"a": 64, "b": false, "c": null}"#).unwrap();
        assert_eq!(got, [("a".into(), s("64")), ("b".into(), s("false")), ("c".into(), Leaf::Null)]);
        // YAML 1.2: `yes` is a string, and config.rs decides what it means for a boolean.
        assert_eq!(parse(Format::Yaml, "a: yes\n").unwrap(), [("a".into(), s("yes"))]);
    }

    #[test]
    fn empty_files_give_no_settings() {
        for (f, t) in [(Format::Yaml, ""), (Format::Yaml, "# only a comment\n"), (Format::Toml, ""), (Format::Json, " \n")] {
            assert_eq!(parse(f, t).unwrap(), [], "{f} {t:?}");
        }
    }

    #[test]
    fn broken_files_are_refused_with_a_reason() {
        for (f, t) in [(Format::Yaml, "a: [1, 2\n"), (Format::Toml, "a = \n"), (Format::Json, "{\"a\": }")] {
            let e = parse(f, t).unwrap_err();
            assert!(matches!(e, FileError::Syntax { format, .. } if format == f), "{f}: {e:?}");
            assert!(!e.to_string().contains('\n'), "one line: {e}");
        }
        assert_eq!(parse(Format::Yaml, "- a\n- b\n").unwrap_err(), FileError::NotATable);
        assert_eq!(parse(Format::Json, "[1]").unwrap_err(), FileError::NotATable);
        assert_eq!(parse(Format::Yaml, "a: 1\n---\nb: 2\n").unwrap_err(), FileError::SeveralDocuments);
        assert_eq!(
            parse(Format::Json, r#"{"cache": {"upstream": {"urls": [{"u": 1}]}}}"#).unwrap_err(),
            FileError::NestedList { key: "cache.upstream.urls".into() }
        );
        assert_eq!(parse(Format::Yaml, "cache:\n  [a]: 1\n").unwrap_err(), FileError::BadKey { at: "cache".into() });
    }
}
