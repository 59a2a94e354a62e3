//! `openapi.yaml` and the router describe the same routes, and the document is whole.

use std::collections::BTreeSet;

use serde_yaml_ng::Value;

const METHODS: &[&str] = &["get", "put", "post", "delete", "patch", "head", "options"];

fn spec() -> Value {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml")).unwrap();
    serde_yaml_ng::from_str(&text).unwrap()
}

#[test]
fn every_route_is_documented_and_every_documented_route_exists() {
    let spec = spec();
    let mut documented = BTreeSet::new();
    for (path, item) in spec["paths"].as_mapping().unwrap() {
        let path = path.as_str().unwrap();
        for (method, _) in item.as_mapping().unwrap() {
            let method = method.as_str().unwrap();
            if METHODS.contains(&method) {
                documented.insert((method.to_uppercase(), path.to_owned()));
            }
        }
    }
    let routes = vqclip::api::routes();
    let served: BTreeSet<(String, String)> = routes.iter().cloned().collect();
    assert_eq!(served.len(), routes.len(), "a route is listed twice");
    let missing: Vec<_> = served.difference(&documented).collect();
    let phantom: Vec<_> = documented.difference(&served).collect();
    assert!(
        missing.is_empty(),
        "routes missing from openapi.yaml: {missing:?}"
    );
    assert!(
        phantom.is_empty(),
        "openapi.yaml lists routes that do not exist: {phantom:?}"
    );
}

fn collect_refs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Mapping(m) => {
            for (k, v) in m {
                if k.as_str() == Some("$ref") {
                    out.push(v.as_str().unwrap().to_owned());
                } else {
                    collect_refs(v, out);
                }
            }
        }
        Value::Sequence(s) => s.iter().for_each(|v| collect_refs(v, out)),
        _ => {}
    }
}

#[test]
fn every_reference_resolves_and_every_path_parameter_is_declared() {
    let spec = spec();
    let mut refs = vec![];
    collect_refs(&spec, &mut refs);
    assert!(!refs.is_empty());
    for r in refs {
        let mut node = &spec;
        for part in r.strip_prefix("#/").unwrap().split('/') {
            node = &node[part];
        }
        assert!(!node.is_null(), "unresolved $ref {r}");
    }
    let resolve = |v: &Value| -> Value {
        match v.get("$ref").and_then(|r| r.as_str()) {
            Some(r) => {
                let mut node = &spec;
                for part in r.strip_prefix("#/").unwrap().split('/') {
                    node = &node[part];
                }
                node.clone()
            }
            None => v.clone(),
        }
    };
    for (path, item) in spec["paths"].as_mapping().unwrap() {
        let path = path.as_str().unwrap();
        let wanted: BTreeSet<String> = path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(str::to_owned)
            .collect();
        for (method, op) in item.as_mapping().unwrap() {
            let method = method.as_str().unwrap();
            if !METHODS.contains(&method) {
                continue;
            }
            let mut declared = BTreeSet::new();
            for source in [&item["parameters"], &op["parameters"]] {
                for p in source.as_sequence().into_iter().flatten() {
                    let p = resolve(p);
                    if p["in"].as_str() == Some("path") {
                        declared.insert(p["name"].as_str().unwrap().to_owned());
                    }
                }
            }
            assert_eq!(declared, wanted, "{method} {path}: path parameters");
            let responses = op["responses"].as_mapping().unwrap();
            assert!(!responses.is_empty(), "{method} {path}: no responses");
            // Every route that reads input documents how it refuses bad input.
            if !wanted.is_empty() || method != "get" {
                assert!(
                    responses
                        .keys()
                        .any(|k| k.as_str().is_some_and(|s| s.starts_with('4'))),
                    "{method} {path}: no 4xx response"
                );
            }
        }
    }
}

/// The document's response for `code` of `method path`, with a `$ref` followed.
fn response<'a>(spec: &'a Value, path: &str, method: &str, code: &str) -> Option<&'a Value> {
    let r = spec["paths"][path][method]["responses"].get(code)?;
    match r.get("$ref").and_then(Value::as_str) {
        Some(reference) => {
            let mut node = spec;
            for part in reference.trim_start_matches("#/").split('/') {
                node = &node[part];
            }
            Some(node)
        }
        None => Some(r),
    }
}

#[test]
fn operations_behind_keys_document_401_and_429() {
    let spec = spec();
    let open = ["/healthz", "/readyz", "/openapi.yaml"];
    for (path, item) in spec["paths"].as_mapping().unwrap() {
        let path = path.as_str().unwrap();
        if open.contains(&path) {
            continue;
        }
        for (method, _) in item.as_mapping().unwrap() {
            let method = method.as_str().unwrap();
            if !METHODS.contains(&method) {
                continue;
            }
            assert!(
                response(&spec, path, method, "401").is_some(),
                "{method} {path}: no 401 although keys can be on"
            );
            // /metrics is outside the per-key request rate.
            if path != "/metrics" {
                let r = response(&spec, path, method, "429")
                    .unwrap_or_else(|| panic!("{method} {path}: no 429 for the key's rate"));
                assert!(
                    !r["headers"]["Retry-After"].is_null(),
                    "{method} {path}: 429 without Retry-After"
                );
            }
        }
    }
}

#[test]
fn partial_content_is_documented_with_the_type_sent() {
    let spec = spec();
    for (path, want) in [
        ("/v1/jobs/{id}/image.png", "image/png"),
        ("/v1/jobs/{id}/frames/{frame}", "image/png"),
        ("/v1/jobs/{id}/video.mp4", "video/mp4"),
        ("/v1/jobs/{id}/metadata.json", "application/json"),
    ] {
        let r = response(&spec, path, "get", "206").unwrap();
        let types: Vec<_> = r["content"]
            .as_mapping()
            .unwrap()
            .keys()
            .map(|k| k.as_str().unwrap())
            .collect();
        assert_eq!(types, vec![want], "{path}");
        let ok: Vec<_> = response(&spec, path, "get", "200").unwrap()["content"]
            .as_mapping()
            .unwrap()
            .keys()
            .map(|k| k.as_str().unwrap())
            .collect();
        assert_eq!(ok, types, "{path}: 200 and 206 differ");
    }
}

#[test]
fn job_spec_maxima_are_the_configured_defaults_and_a_prompt_is_required() {
    let spec = spec();
    let props = &spec["components"]["schemas"]["JobSpec"]["properties"];
    let limits = vqclip::config::Config::defaults().limits;
    let max = |field: &str| props[field]["maximum"].as_u64();
    assert_eq!(max("width"), Some(limits.max_side.into()));
    assert_eq!(max("height"), Some(limits.max_side.into()));
    assert_eq!(max("steps"), Some(limits.max_steps.into()));
    assert_eq!(max("cutn"), Some(limits.max_cutn.into()));
    let alternatives = spec["components"]["schemas"]["JobSpec"]["anyOf"]
        .as_sequence()
        .expect("JobSpec says a prompt of some kind is required");
    let required: Vec<_> = alternatives
        .iter()
        .map(|a| a["required"][0].as_str().unwrap())
        .collect();
    assert_eq!(required, ["prompts", "image_prompts", "noise_prompts"]);
    // The limits route publishes the configured values under the documented names.
    let documented = spec["components"]["schemas"]["Limits"]["required"]
        .as_sequence()
        .unwrap();
    assert!(documented.iter().any(|k| k.as_str() == Some("max_steps")));
}
