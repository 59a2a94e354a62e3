//! The README's JSON examples agree with `openapi.yaml`: every field a README response
//! shows exists in the schema, and every request body it sends is a valid JobSpec shape.

use serde_yaml_ng::Value;

fn root() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn schema(spec: &Value, name: &str) -> Value {
    spec["components"]["schemas"][name].clone()
}

/// Fields of `value` that `schema` does not declare, with their JSON paths; nested
/// objects are checked against nested `properties` and `$ref`s.
fn undeclared(spec: &Value, schema: &Value, value: &serde_json::Value, path: &str) -> Vec<String> {
    let schema = match schema.get("$ref").and_then(Value::as_str) {
        Some(r) => schema_at(spec, r),
        None => schema.clone(),
    };
    let mut out = vec![];
    let Some(obj) = value.as_object() else {
        return out;
    };
    let props = &schema["properties"];
    for (key, v) in obj {
        let declared = &props[key.as_str()];
        if declared.is_null() {
            out.push(format!("{path}.{key}"));
        } else {
            out.extend(undeclared(spec, declared, v, &format!("{path}.{key}")));
        }
    }
    out
}

fn schema_at(spec: &Value, reference: &str) -> Value {
    let mut node = spec;
    for part in reference.trim_start_matches("#/").split('/') {
        node = &node[part];
    }
    node.clone()
}

/// `# => {...}` lines, with a trailing `, ...` (the README's "and so on") removed.
fn shown_responses(readme: &str) -> Vec<serde_json::Value> {
    readme
        .lines()
        .filter_map(|l| l.trim().strip_prefix("# => "))
        .map(|json| {
            let json = json.replace(", ...}", "}");
            serde_json::from_str(&json).unwrap_or_else(|e| panic!("README example {json}: {e}"))
        })
        .collect()
}

/// The bodies of `curl ... /v1/jobs ... -d '{...}'`, which may span lines.
fn submitted_specs(readme: &str) -> Vec<serde_json::Value> {
    let mut out = vec![];
    let mut rest = readme;
    while let Some(start) = rest.find("/v1/jobs -H 'content-type: application/json' -d '") {
        let body_start = start + "/v1/jobs -H 'content-type: application/json' -d '".len();
        let end = rest[body_start..].find('\'').unwrap() + body_start;
        let body = &rest[body_start..end];
        out.push(
            serde_json::from_str(body).unwrap_or_else(|e| panic!("README job body {body}: {e}")),
        );
        rest = &rest[end..];
    }
    out
}

#[test]
fn readme_json_examples_match_the_schema() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let spec: Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(root().join("openapi.yaml")).unwrap())
            .unwrap();
    let responses = shown_responses(&readme);
    assert!(!responses.is_empty(), "the README shows no response");
    for example in &responses {
        // Every `# =>` in the README answers a job route.
        let bad = undeclared(&spec, &schema(&spec, "Job"), example, "job");
        assert!(
            bad.is_empty(),
            "README shows fields the API does not return: {bad:?} in {example}"
        );
    }
    let specs = submitted_specs(&readme);
    assert!(specs.len() >= 2, "the README submits jobs");
    for body in &specs {
        let bad = undeclared(&spec, &schema(&spec, "JobSpec"), body, "spec");
        assert!(
            bad.is_empty(),
            "README sends fields a JobSpec does not have: {bad:?}"
        );
        // A job needs a prompt of some kind: the schema says which fields can be it.
        let alternatives = schema(&spec, "JobSpec")["anyOf"]
            .as_sequence()
            .unwrap()
            .clone();
        assert!(
            alternatives.iter().any(|alt| {
                alt["required"]
                    .as_sequence()
                    .unwrap()
                    .iter()
                    .all(|k| body.get(k.as_str().unwrap()).is_some())
            }),
            "README job body has no prompt: {body}"
        );
    }
}
