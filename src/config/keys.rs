//! Reading one TOML table into a raw struct with problems that name their key: the key path
//! comes from serde itself (`serde_path_to_error` over a small deserializer for `toml::Value`
//! whose error type records serde's `Unexpected` / `Expected` values), and the keys a struct
//! knows come from its derived `Deserialize` (the field list serde hands to `deserialize_struct`).
//! No serde or toml message text is ever parsed, so a toml upgrade cannot change a key path.
//!
//! Must never: put a value from the file into a message (a secret typed into the wrong key would
//! be printed); messages name types and keys only.

use std::fmt;

use serde::de::value::{MapDeserializer, SeqDeserializer};
use serde::de::{self, DeserializeOwned, Expected, IntoDeserializer, Unexpected, Visitor};
use serde::forward_to_deserialize_any;

/// Why a value could not be read: a wrong type, or something else (never with the value).
#[derive(Debug)]
pub enum ReadError {
    WrongType {
        /// What the file holds: `string`, `integer`, ...
        found: &'static str,
        /// What the key wants, from the target type's `expecting`.
        expected: String,
    },
    Other,
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadError::WrongType { found, expected } => {
                write!(f, "expected {}, found {found}", friendly(expected))
            }
            ReadError::Other => f.write_str("this value cannot be read here"),
        }
    }
}

impl std::error::Error for ReadError {}

impl de::Error for ReadError {
    fn custom<T: fmt::Display>(_: T) -> Self {
        ReadError::Other
    }
    fn invalid_type(unexp: Unexpected<'_>, exp: &dyn Expected) -> Self {
        ReadError::WrongType {
            found: kind(&unexp),
            expected: exp.to_string(),
        }
    }
    fn invalid_value(unexp: Unexpected<'_>, exp: &dyn Expected) -> Self {
        Self::invalid_type(unexp, exp)
    }
    fn invalid_length(_: usize, _: &dyn Expected) -> Self {
        ReadError::Other
    }
}

/// The TOML name of what a value is, without the value.
fn kind(unexp: &Unexpected<'_>) -> &'static str {
    match unexp {
        Unexpected::Bool(_) => "boolean",
        Unexpected::Signed(_) | Unexpected::Unsigned(_) => "integer",
        Unexpected::Float(_) => "float",
        Unexpected::Str(_) | Unexpected::Char(_) => "string",
        Unexpected::Seq => "array",
        Unexpected::Map => "table",
        _ => "another type",
    }
}

/// serde's names for primitive targets, as a TOML user would say them.
fn friendly(expected: &str) -> &str {
    match expected {
        "i8" | "i16" | "i32" | "i64" | "u8" | "u16" | "u32" | "u64" | "usize" => "an integer",
        "f32" | "f64" => "a number",
        "a sequence" => "an array",
        other => other,
    }
}

/// A problem found while reading a table: where (relative to the table) and what.
#[derive(Debug)]
pub struct Problem {
    /// e.g. `tls`, `key_hashes[1]`; for an unknown key, the key itself.
    pub key: String,
    pub message: String,
}

/// The fields `T`'s derived `Deserialize` knows, as serde passes them to `deserialize_struct`.
/// Empty for a type that is not a struct. (A `#[serde(flatten)]` field would hide its keys from
/// this list: the raw structs do not use it.)
pub fn fields_of<T: DeserializeOwned>() -> &'static [&'static str] {
    struct Probe<'a>(&'a mut &'static [&'static str]);
    impl<'de> de::Deserializer<'de> for Probe<'_> {
        type Error = ReadError;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, ReadError> {
            Err(ReadError::Other)
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, ReadError> {
            *self.0 = fields;
            Err(ReadError::Other)
        }
        forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
            ignored_any
        }
    }
    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(Probe(&mut fields));
    fields
}

/// `unknown key (did you mean `x`? expected one of ...)` for a key not in `known`.
pub fn unknown_key(key: &str, known: &[&str]) -> String {
    let list = known
        .iter()
        .map(|k| format!("`{k}`"))
        .collect::<Vec<_>>()
        .join(", ");
    match did_you_mean(key, known) {
        Some(near) => format!("unknown key (did you mean `{near}`? expected one of {list})"),
        None => format!("unknown key (expected one of {list})"),
    }
}

/// The known key closest to `key`, if it is close enough to be a typo: at most a third of its
/// letters differ (at least one).
pub fn did_you_mean<'a>(key: &str, known: &[&'a str]) -> Option<&'a str> {
    let limit = (key.chars().count() / 3).max(1);
    known
        .iter()
        .map(|k| (strsim::damerau_levenshtein(key, k), *k))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// Reads `table` as `T`. Keys `T` does not know are reported and removed first; then a value of
/// the wrong type is reported (with its path) and its top-level key removed, and the rest read
/// again, so one mistake hides no other. `None` when the table cannot be read at all.
pub fn read<T: DeserializeOwned>(mut table: toml::Table, problems: &mut Vec<Problem>) -> Option<T> {
    let known = fields_of::<T>();
    let unknown: Vec<String> = table
        .keys()
        .filter(|k| !known.contains(&k.as_str()))
        .cloned()
        .collect();
    for key in unknown {
        table.remove(&key);
        problems.push(Problem {
            message: unknown_key(&key, known),
            key,
        });
    }
    loop {
        let value = Node(toml::Value::Table(table.clone()));
        let err = match serde_path_to_error::deserialize::<_, T>(value) {
            Ok(t) => return Some(t),
            Err(e) => e,
        };
        let mut key = String::new();
        let mut field = None;
        for segment in err.path().iter() {
            match segment {
                serde_path_to_error::Segment::Map { key: k } => {
                    if !key.is_empty() {
                        key.push('.');
                    }
                    key.push_str(k);
                    field.get_or_insert_with(|| k.clone());
                }
                serde_path_to_error::Segment::Seq { index } => key.push_str(&format!("[{index}]")),
                _ => {}
            }
        }
        problems.push(Problem {
            key,
            message: err.into_inner().to_string(),
        });
        // Nothing left to remove (a problem with the table itself): give up on it.
        field.and_then(|f| table.remove(&f))?;
    }
}

/// A `toml::Value` as a serde deserializer whose error is [`ReadError`].
struct Node(toml::Value);

impl<'de> IntoDeserializer<'de, ReadError> for Node {
    type Deserializer = Node;
    fn into_deserializer(self) -> Node {
        self
    }
}

impl<'de> de::Deserializer<'de> for Node {
    type Error = ReadError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ReadError> {
        match self.0 {
            toml::Value::String(s) => visitor.visit_string(s),
            toml::Value::Integer(i) => visitor.visit_i64(i),
            toml::Value::Float(f) => visitor.visit_f64(f),
            toml::Value::Boolean(b) => visitor.visit_bool(b),
            toml::Value::Datetime(d) => visitor.visit_string(d.to_string()),
            toml::Value::Array(items) => {
                let mut seq = SeqDeserializer::new(items.into_iter().map(Node));
                let value = visitor.visit_seq(&mut seq)?;
                seq.end()?;
                Ok(value)
            }
            toml::Value::Table(table) => {
                let mut map = MapDeserializer::new(table.into_iter().map(|(k, v)| (k, Node(v))));
                let value = visitor.visit_map(&mut map)?;
                map.end()?;
                Ok(value)
            }
        }
    }

    /// A key that is present is `Some`: TOML has no null.
    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ReadError> {
        visitor.visit_some(self)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        visitor: V,
    ) -> Result<V::Value, ReadError> {
        visitor.visit_newtype_struct(self)
    }

    forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        unit unit_struct seq tuple tuple_struct map struct enum identifier ignored_any
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Sample {
        address: Option<String>,
        count: Option<i64>,
        #[serde(default)]
        names: Vec<String>,
        sub: Option<toml::Value>,
    }

    fn problems(text: &str) -> (Option<Sample>, Vec<Problem>) {
        let mut problems = Vec::new();
        let sample = read::<Sample>(text.parse().unwrap(), &mut problems);
        (sample, problems)
    }

    #[test]
    fn the_known_keys_are_the_struct_fields() {
        assert_eq!(fields_of::<Sample>(), &["address", "count", "names", "sub"]);
        assert!(fields_of::<String>().is_empty());
    }

    #[test]
    fn paths_and_types_come_from_serde_not_from_its_messages() {
        let (sample, all) = problems(
            "address = 8080\ncount = \"secret-like\"\nnames = [\"a\", 7]\nsub = { x = 1 }\n",
        );
        let sample = sample.unwrap();
        assert!(sample.sub.is_some(), "the rest is still read");
        let got: Vec<(&str, &str)> = all
            .iter()
            .map(|p| (p.key.as_str(), p.message.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("address", "expected a string, found integer"),
                ("count", "expected an integer, found string"),
                ("names[1]", "expected a string, found integer"),
            ]
        );
        assert!(all.iter().all(|p| !p.message.contains("secret-like")));
    }

    #[test]
    fn unknown_keys_are_all_reported_with_a_suggestion() {
        let (sample, all) = problems("adress = \"x\"\ncolour = 1\ncount = 2\n");
        assert_eq!(sample.unwrap().count, Some(2));
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].key, "adress");
        assert!(
            all[0]
                .message
                .starts_with("unknown key (did you mean `address`?"),
            "{}",
            all[0].message
        );
        assert_eq!(all[1].key, "colour");
        assert_eq!(
            all[1].message,
            "unknown key (expected one of `address`, `count`, `names`, `sub`)"
        );
    }

    #[test]
    fn suggestions_only_for_near_misses() {
        let known = ["shutdown_grace", "idle_timeout", "name"];
        assert_eq!(
            did_you_mean("shutdown_grase", &known),
            Some("shutdown_grace")
        );
        assert_eq!(did_you_mean("idel_timeout", &known), Some("idle_timeout"));
        assert_eq!(did_you_mean("nmae", &known), Some("name"));
        assert_eq!(did_you_mean("colour", &known), None);
    }
}
