//! Tables and field lists for people (`--json` prints the API's own JSON instead).

use serde_json::Value;

fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Left-aligned columns, two spaces apart.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<String>| {
        let joined: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(joined.join("  ").trim_end());
        out.push('\n');
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row.clone());
    }
    out
}

pub fn render_vms(data: &Value) -> String {
    let rows: Vec<Vec<String>> = data["instances"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|vm| {
                    ["id", "name", "status", "ip_address", "created_at"]
                        .iter()
                        .map(|k| text(&vm[*k]))
                        .collect()
                })
                .collect()
        })
        .unwrap_or_default();
    let mut out = table(&["ID", "NAME", "STATUS", "IP", "CREATED"], &rows);
    out.push_str(&format!(
        "{} of {} shown\n",
        rows.len(),
        text(&data["pagination"]["total"])
    ));
    out
}

/// `key: value` lines, nested objects flattened with dots.
pub fn render_fields(data: &Value) -> String {
    let mut out = String::new();
    flatten("", data, &mut out);
    out
}

fn flatten(prefix: &str, v: &Value, out: &mut String) {
    match v {
        Value::Object(map) => {
            for (k, val) in map {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, val, out);
            }
        }
        Value::Array(items) if items.iter().all(|i| !i.is_object()) => {
            let joined: Vec<String> = items.iter().map(text).collect();
            out.push_str(&format!("{prefix}: {}\n", joined.join(", ")));
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                flatten(&format!("{prefix}[{i}]"), item, out);
            }
        }
        other => out.push_str(&format!("{prefix}: {}\n", text(other))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn vm_tables_have_one_row_per_vm() {
        let data = json!({
            "instances": [{"id": "a", "name": "web1", "status": "running",
                           "ip_address": "192.0.2.10", "created_at": "t"}],
            "pagination": {"total": 1}
        });

        let out = render_vms(&data);

        assert_eq!(
            out,
            "ID  NAME  STATUS   IP          CREATED\na   web1  running  192.0.2.10  t\n1 of 1 shown\n"
        );
    }

    #[test]
    fn nested_fields_flatten_with_dots() {
        let out = render_fields(&json!({"cpu": {"cores": 2}, "load": [1, 2]}));

        assert_eq!(out, "cpu.cores: 2\nload: 1, 2\n");
    }
}
