//! `openapi.yaml` and the router describe the same routes, and the document is whole.

use std::collections::BTreeSet;

use serde_yaml::Value;

const METHODS: &[&str] = &["get", "put", "post", "delete", "patch", "head", "options"];

fn spec() -> Value {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml")).unwrap();
    serde_yaml::from_str(&text).unwrap()
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
