//! The document templates in `cloud-init/` and their one substitution rule.
//!
//! A template is YAML text with `{{name}}` placeholders. Each placeholder is replaced by the
//! JSON encoding of its value: strings become double-quoted scalars with every quote,
//! backslash and control character escaped, lists become flow sequences. JSON is valid YAML,
//! so the rendered value is exactly one YAML node whatever it contains.

use serde_json::Value;

use super::CloudInitError;

pub const USER_DATA: &str = include_str!("../../cloud-init/user-data.tmpl");
pub const META_DATA: &str = include_str!("../../cloud-init/meta-data.tmpl");
pub const NETWORK_CONFIG: &str = include_str!("../../cloud-init/network-config.tmpl");

/// Replaces every `{{name}}` in `template` with the JSON of `values[name]`. A placeholder
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
        out.push_str(&values[index].1.to_string());
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn values_are_rendered_as_json() {
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
    fn missing_and_unused_values_are_errors() {
        assert!(render("t", "{{a}}", &[]).is_err());
        assert!(render("t", "x", &[("a", json!(1))]).is_err());
        assert!(render("t", "{{a", &[("a", json!(1))]).is_err());
    }
}
