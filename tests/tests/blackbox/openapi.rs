//! The OpenAPI document: committed, current, served, and the router's exact
//! map. `convscope openapi > openapi/openapi.json` regenerates it.

use convscope_tests::*;
use serde_json::Value;

const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

fn committed() -> String {
    std::fs::read_to_string(repo().join("openapi/openapi.json"))
        .expect("openapi/openapi.json is committed")
}

#[test]
fn the_committed_document_is_the_one_the_code_generates() {
    let generated = convscope::openapi::document_json();
    assert!(
        generated == committed(),
        "openapi/openapi.json is stale: run `cargo run --release -- openapi > openapi/openapi.json` and commit it"
    );
}

#[test]
fn the_document_is_openapi_3_1_and_every_operation_is_complete() {
    let doc: Value = serde_json::from_str(&committed()).unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    assert!(doc["info"]["title"].is_string() && doc["info"]["version"].is_string());
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() >= 20, "{} paths", paths.len());
    let mut ids = std::collections::HashSet::new();
    for (path, item) in paths {
        for (method, op) in item.as_object().unwrap() {
            let what = format!("{} {path}", method.to_uppercase());
            assert!(METHODS.contains(&method.as_str()), "{what}");
            assert!(op["summary"].is_string(), "{what} has no summary");
            assert!(
                op["tags"].as_array().is_some_and(|t| !t.is_empty()),
                "{what} has no tag"
            );
            let id = op["operationId"].as_str().unwrap();
            assert!(ids.insert(id.to_string()), "duplicate operationId {id}");
            // Path templates and path parameters agree.
            let declared: Vec<&str> = op["parameters"]
                .as_array()
                .map(|ps| {
                    ps.iter()
                        .filter(|p| p["in"] == "path")
                        .map(|p| p["name"].as_str().unwrap())
                        .collect()
                })
                .unwrap_or_default();
            let templated: Vec<&str> = path
                .split('/')
                .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
                .collect();
            assert_eq!(declared, templated, "{what}");
            let responses = op["responses"].as_object().unwrap();
            assert!(
                responses.keys().any(|k| k.starts_with('2')),
                "{what} documents no success"
            );
            // Every documented error is problem+json, except the inference
            // protocol's, which are its own `{"error"}`.
            let (media, schema) = if path == "/v2" || path.starts_with("/v2/") {
                ("application/json", "#/components/schemas/V2ErrorBody")
            } else {
                ("application/problem+json", "#/components/schemas/Problem")
            };
            for (code, r) in responses
                .iter()
                .filter(|(k, _)| k.starts_with('4') || k.starts_with('5'))
            {
                assert!(
                    r["content"][media]["schema"]["$ref"] == schema,
                    "{what} {code} is not {media} of {schema}"
                );
            }
            // Every $ref points at a component that exists.
            let text = op.to_string();
            for r in text.split("\"$ref\":\"").skip(1) {
                let name = r.split('"').next().unwrap();
                let name = name.strip_prefix("#/components/schemas/").unwrap();
                assert!(
                    doc["components"]["schemas"][name].is_object(),
                    "{what}: {name}"
                );
            }
        }
    }
}

/// Walks the live router with every (path, method) pair: each documented
/// operation is answered by its handler (never the not-found or
/// method-not-allowed fallback), and each undocumented method on a
/// documented path is 405. Routes are only added through `routes!`, which
/// documents them, so the document is the router's map in both directions.
#[tokio::test(flavor = "multi_thread")]
async fn the_router_answers_exactly_the_documented_operations() {
    let dir = models_dir(&["resnet20-cifar10"]);
    let app = TestApp::spawn(dir.path()).await;
    let served = app
        .client
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(served.status(), 200);
    assert!(
        served.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    let served = served.text().await.unwrap();
    assert_eq!(
        served,
        committed(),
        "GET /openapi.json serves the committed document"
    );
    let doc: Value = serde_json::from_str(&served).unwrap();
    let mut operations = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        // An unknown model: handlers answer 404 "model ... not found", never
        // touching the bundled one (DELETE included).
        let concrete = path
            .replace("{model}", "no-such-model")
            .replace("{layer}", "conv1");
        for method in METHODS {
            let documented = item.get(method).is_some();
            let r = app
                .client
                .request(method.to_uppercase().parse().unwrap(), app.url(&concrete))
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let body = r.text().await.unwrap();
            let what = format!("{} {concrete}", method.to_uppercase());
            if documented {
                operations += 1;
                assert!(status != 405, "{what}: documented but 405: {body}");
                assert!(
                    !body.contains("no route for"),
                    "{what}: documented but unrouted: {body}"
                );
                assert!(status < 500, "{what}: {status} {body}");
            } else {
                assert_eq!(status, 405, "{what}: undocumented but answered: {body}");
            }
        }
    }
    assert!(operations >= 27, "{operations} operations");
    // And a path the document does not list is the router's 404.
    let (status, body) = app.get_json("/models/no-such-model/nothing-here").await;
    assert_eq!(status, 404);
    assert!(body["detail"].as_str().unwrap().contains("no route for"));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_inspector_and_swagger_ui_are_served_from_the_binary() {
    let dir = models_dir(&["resnet20-cifar10"]);
    let app = TestApp::spawn(dir.path()).await;
    for (path, kind, needle) in [
        ("/", "text/html", "convscope"),
        ("/docs", "text/html", "/openapi.json"),
        (
            "/docs/swagger-ui-bundle.js",
            "text/javascript",
            "SwaggerUIBundle",
        ),
        ("/docs/swagger-ui.css", "text/css", ".swagger-ui"),
    ] {
        let r = app.client.get(app.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert!(
            r.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with(kind),
            "{path}"
        );
        let text = r.text().await.unwrap();
        assert!(text.contains(needle), "{path} lacks {needle}");
        // No CDN: nothing is fetched from another host.
        if kind == "text/html" {
            for attr in ["src=\"http", "href=\"http", "src=\"//", "href=\"//"] {
                assert!(!text.contains(attr), "{path} loads {attr}...");
            }
        }
    }
    app.stop().await;
}
