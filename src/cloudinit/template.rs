//! The document templates in `cloud-init/` and their one substitution rule.
//!
//! A template is YAML text with `{{name}}` placeholders. Each placeholder is replaced by its
//! value written as one YAML flow node: a string becomes a double-quoted scalar, a list a
//! flow sequence (`[..]`), a map a flow mapping (`{..}`), and numbers, booleans and null
//! read as in JSON. For ASCII text this is exactly the compact JSON encoding.
//!
//! The output is printable ASCII whatever the values hold. cloud-init parses with PyYAML
//! (YAML 1.1), which takes U+0085, U+2028 and U+2029 for line breaks and rejects the whole
//! document at any character it deems non-printable (DEL, C1 controls, U+FFFE, …), even
//! inside quotes; JSON would pass all of those through raw. So a string escapes `"`, `\`
//! and every ASCII control including DEL (`\n`, `\t`, `\u001B`, as JSON spells them),
//! every other character up to U+FFFF as `\uXXXX` and every one above as `\UXXXXXXXX`
//! (YAML's own escapes, never JSON's surrogate pairs). A value can neither close its quote,
//! start a line nor add a key, and YAML reads back exactly the value given.

use std::fmt::Write as _;

use serde_json::Value;

use super::CloudInitError;

pub const USER_DATA: &str = include_str!("../../cloud-init/user-data.tmpl");
pub const META_DATA: &str = include_str!("../../cloud-init/meta-data.tmpl");
pub const NETWORK_CONFIG: &str = include_str!("../../cloud-init/network-config.tmpl");

/// Replaces every `{{name}}` in `template` with the YAML of `values[name]`. A placeholder
/// without a value, or a value no placeholder uses, is an error: both mean the template and
/// the code disagree.
pub fn render(
    template_name: &str,
    template: &str,
    values: &[(&str, Value)],
) -> Result<String, CloudInitError> {
    let mut out = String::with_capacity(template.len() + 256);
    let mut used = vec![false; values.len()];
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find("}}").ok_or_else(|| CloudInitError::Template {
            template: template_name.to_owned(),
            reason: "unclosed {{".into(),
        })?;
        let name = after[..end].trim();
        let index = values.iter().position(|(k, _)| *k == name).ok_or_else(|| {
            CloudInitError::Template {
                template: template_name.to_owned(),
                reason: format!("no value for placeholder {name:?}"),
            }
        })?;
        used[index] = true;
        write_node(&mut out, &values[index].1);
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    if let Some(i) = used.iter().position(|u| !u) {
        return Err(CloudInitError::Template {
            template: template_name.to_owned(),
            reason: format!("value {:?} is not used", values[i].0),
        });
    }
    Ok(out)
}

/// Writes `value` as one YAML flow node of printable ASCII (see the module doc).
fn write_node(out: &mut String, value: &Value) {
    match value {
        Value::Null | Value::Bool(_) | Value::Number(_) => out.push_str(&value.to_string()),
        Value::String(s) => write_string(out, s),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_node(out, item);
            }
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            for (i, (key, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_string(out, key);
                out.push(':');
                write_node(out, item);
            }
            out.push('}');
        }
    }
}

/// A YAML double-quoted scalar that reads back as exactly `s`.
fn write_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            ' '..='~' => out.push(c),
            // `write!` into a String cannot fail.
            '\0'..='\u{ffff}' => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            _ => {
                let _ = write!(out, "\\U{:08X}", c as u32);
            }
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ascii_values_are_rendered_as_compact_json() {
        let out = render(
            "t",
            "a: {{x}}\nb: {{ y }}\n",
            &[("x", json!("v")), ("y", json!([1, 2]))],
        )
        .unwrap();

        assert_eq!(out, "a: \"v\"\nb: [1,2]\n");
    }

    #[test]
    fn hostile_strings_stay_one_scalar() {
        let out = render("t", "k: {{x}}\n", &[("x", json!("a\"\nevil: true\n#"))]).unwrap();

        assert_eq!(out.lines().count(), 1);
        assert_eq!(out, "k: \"a\\\"\\nevil: true\\n#\"\n");
    }

    #[test]
    fn maps_become_flow_mappings_with_quoted_keys() {
        let out = render(
            "t",
            "k: {{x}}",
            &[("x", json!({"a b": {"c": [true, null, 7]}}))],
        )
        .unwrap();

        assert_eq!(out, r#"k: {"a b":{"c":[true,null,7]}}"#);
    }

    #[test]
    fn yaml_line_breaks_and_non_printables_are_escaped() {
        let value = "a\u{85}b\u{2028}c\u{2029}d\u{7f}e\u{1b}f\u{9f}g\u{fffe}h\u{8}\u{c}\0";

        let out = render("t", "k: {{x}}", &[("x", json!(value))]).unwrap();

        assert_eq!(
            out,
            r#"k: "a\u0085b\u2028c\u2029d\u007Fe\u001Bf\u009Fg\uFFFEh\b\f\u0000""#
        );
    }

    #[test]
    fn astral_characters_use_yaml_escapes_not_surrogate_pairs() {
        let out = render("t", "k: {{x}}", &[("x", json!("é😀\u{10ffff}"))]).unwrap();

        assert_eq!(out, r#"k: "\u00E9\U0001F600\U0010FFFF""#);
    }

    #[test]
    fn missing_and_unused_values_are_errors() {
        assert!(render("t", "{{a}}", &[]).is_err());
        assert!(render("t", "x", &[("a", json!(1))]).is_err());
        assert!(render("t", "{{a", &[("a", json!(1))]).is_err());
    }
}
