//! Cascading randomisation (Adebayo et al. 2018) over HTTP: Grad-CAM on
//! ResNet-20 loses its map as the layers are re-initialised, nothing
//! re-initialised changes nothing, a seed gives the same cascade, and bad
//! parameters are 400s.

use convscope_tests::*;
use serde_json::Value;

fn spearmans(body: &Value) -> Vec<f64> {
    body["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["spearman"].as_f64().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn grad_cam_fails_to_survive_the_randomisation_of_its_network() {
    let dir = models_dir(&["resnet20-cifar10"]);
    let app = TestApp::spawn(dir.path()).await;
    let cat = std::fs::read(repo().join("data/cifar10/samples/test0000_cat.png")).unwrap();
    let url = |q: &str| format!("/models/resnet20-cifar10/sanity?{q}");
    let a = app.post_images_json(&url("seed=1"), &[&cat]).await;
    let steps = a["steps"].as_array().unwrap();
    // conv1, bn1, 9 blocks of conv-bn-conv-bn, linear: 39 layers + the unchanged first step.
    assert_eq!(steps.len(), 40, "{a}");
    assert_eq!(steps[0]["layer"], Value::Null);
    assert_eq!(steps[1]["layer"], "linear", "output side first");
    assert_eq!(steps[39]["layer"], "conv1");
    let r = spearmans(&a);
    assert_eq!((r[0], steps[0]["ssim"].as_f64().unwrap()), (1.0, 1.0));
    let half = (steps.len() - 1) / 2;
    assert!(
        r[1..=half].iter().any(|&v| v < 0.5),
        "Spearman never fell below 0.5 by half of the layers: {r:?}"
    );
    // A seed is a cascade: the same again, another one differs.
    let b = app.post_images_json(&url("seed=1"), &[&cat]).await;
    assert_eq!(a["steps"], b["steps"]);
    let c = app.post_images_json(&url("seed=2"), &[&cat]).await;
    assert_ne!(a["steps"], c["steps"]);
    // Nothing re-initialised: the map itself.
    let none = app.post_images_json(&url("layers="), &[&cat]).await;
    assert_eq!(spearmans(&none), [1.0]);
    // A chosen cascade, another method, and its strip of maps.
    let some = app
        .post_images_json(
            &url("method=integrated_gradients&layers=linear,layer3.2.bn2"),
            &[&cat],
        )
        .await;
    assert_eq!(some["method"], "integrated_gradients");
    assert_eq!(some["steps"].as_array().unwrap().len(), 3);
    let r = app
        .post_images(
            &url("format=png&layers=linear,layer3.2.bn2,layer3.2.conv2"),
            &[&cat],
        )
        .await;
    assert_eq!(r.status().as_u16(), 200);
    let img = image::load_from_memory(&r.bytes().await.unwrap()).unwrap();
    assert!(img.width() > 3 * img.height(), "a strip of 4 maps in a row");
    for (q, says) in [
        ("layers=layer9", "not a layer with parameters"),
        ("layers=layer3", "not a layer with parameters"),
        ("method=lime", "gradcam++"),
        ("method=gradcam,vanilla", "one method"),
        ("format=svg", "json or png"),
        ("seed=-1", "seed"),
    ] {
        let r = app.post_images(&url(q), &[&cat]).await;
        let (status, body) = problem(r).await;
        let want = if q.starts_with("seed") { 422 } else { 400 };
        assert_problem(status, &body, want, says);
    }
    let r = app.post_images(&url(""), &[&cat, &cat]).await;
    let (status, body) = problem(r).await;
    assert_problem(status, &body, 400, "one image");
    app.assert_healthy().await;
    app.stop().await;
}
