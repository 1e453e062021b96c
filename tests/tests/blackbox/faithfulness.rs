//! Faithfulness scores over HTTP: deletion and insertion against a NumPy
//! implementation of the contract's definition, ROAD and the confidence
//! metrics against pytorch-grad-cam 1.5.7 (tests/fixtures/faithfulness,
//! tools/golden/faithfulness.py); the plot; bad parameters.

use convscope_tests::*;
use serde_json::Value;

fn f32s_of(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn scores_match_numpy_and_pytorch_grad_cam() {
    let dir = models_dir(&["resnet20-cifar10", "cnn-a-mnist"]);
    let app = TestApp::spawn(dir.path()).await;
    let index: Value = serde_json::from_slice(
        &std::fs::read(repo().join("tests/fixtures/faithfulness/index.json")).unwrap(),
    )
    .unwrap();
    let steps = index["steps"].as_u64().unwrap();
    for case in index["cases"].as_array().unwrap() {
        let (model, method, layer) = (
            case["model"].as_str().unwrap(),
            case["method"].as_str().unwrap(),
            case["layer"].as_str().unwrap(),
        );
        let image = std::fs::read(repo().join(case["image"].as_str().unwrap())).unwrap();
        let want = &case["scores"];
        for baseline in ["zero", "blur"] {
            let got = app
                .post_images_json(
                    &format!("/models/{model}/faithfulness?methods={method}&layer={layer}&steps={steps}&baseline={baseline}"),
                    &[&image],
                )
                .await;
            let what = format!("{model} {method} baseline={baseline}");
            assert_eq!(got["class_index"], case["class_index"], "{what}: {got}");
            let scores = &got["scores"][method];
            let curves = &got["curves"][method];
            let deletion = if baseline == "zero" {
                "deletion"
            } else {
                "deletion_blur"
            };
            // Probabilities in [0, 1]: absolute tolerances.
            for (ours, theirs, tol) in [
                (&scores["deletion"], &want[deletion], 1e-5),
                (&scores["insertion"], &want["insertion"], 1e-5),
                (&scores["road_morf"], &want["road_morf"], 1e-4),
                (&scores["road_lerf"], &want["road_lerf"], 1e-4),
                (
                    &scores["drop_in_confidence"],
                    &want["drop_in_confidence"],
                    1e-4,
                ),
                (
                    &scores["increase_in_confidence"],
                    &want["increase_in_confidence"],
                    0.0,
                ),
            ] {
                let (o, t) = (ours.as_f64().unwrap(), theirs.as_f64().unwrap());
                assert!(
                    (o - t).abs() <= tol,
                    "{what}: {ours} vs {theirs} ({scores})"
                );
            }
            for (name, fixture) in [("deletion", deletion), ("insertion", "insertion")] {
                let (o, t) = (f32s_of(&curves[name]), f32s_of(&case["curves"][fixture]));
                assert_eq!(o.len(), steps as usize + 1);
                assert_close_with_floor(&o, &t, 1e-5, 1.0, &format!("{what}: {name} curve"));
            }
            assert_eq!(
                got["fractions"].as_array().unwrap().len(),
                steps as usize + 1
            );
        }
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_report_of_several_methods_plots_and_refuses_what_it_cannot_score() {
    let dir = models_dir(&["resnet20-cifar10"]);
    let app = TestApp::spawn(dir.path()).await;
    let cat = std::fs::read(repo().join("data/cifar10/samples/test0000_cat.png")).unwrap();
    let got = app
        .post_images_json(
            "/models/resnet20-cifar10/faithfulness?methods=gradcam,integrated_gradients,occlusion&metrics=deletion,insertion,road_morf,road_lerf",
            &[&cat],
        )
        .await;
    for m in ["gradcam", "integrated_gradients", "occlusion"] {
        let s = got["scores"][m].as_object().unwrap();
        assert_eq!(s.len(), 4, "{got}");
        assert!(s.values().all(|v| v.as_f64().unwrap().is_finite()));
    }
    let r = app
        .post_images(
            "/models/resnet20-cifar10/faithfulness?methods=gradcam,vanilla&format=png",
            &[&cat],
        )
        .await;
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.headers()["content-type"], "image/png");
    let png = r.bytes().await.unwrap();
    image::load_from_memory(&png).unwrap();
    if std::env::var_os("CONVSCOPE_WRITE_DOCS").is_some() {
        std::fs::write(repo().join("docs/img/faithfulness-curves.png"), &png).unwrap();
    }
    for (q, says) in [
        ("methods=lime", "gradcam++"),
        ("methods=gradcam&metrics=auc", "road_morf"),
        ("methods=", "at least one"),
        ("steps=0", "steps must be in 1..=100"),
        ("steps=101", "steps must be in 1..=100"),
        ("baseline=white", "zero or blur"),
        ("format=svg", "json or png"),
        ("metrics=road_morf&format=png", "deletion and insertion"),
        ("layer=linear", "no spatial extent"),
    ] {
        let r = app
            .post_images(
                &format!("/models/resnet20-cifar10/faithfulness?{q}"),
                &[&cat],
            )
            .await;
        let (status, body) = problem(r).await;
        assert_problem(status, &body, 400, says);
    }
    app.assert_healthy().await;
    app.stop().await;
}
