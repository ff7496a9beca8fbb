//! The evaluation of self-supervised features: the L-BFGS logistic
//! regression against PyTorch's reference probe, label subsets and the
//! few-label probe suite.

use aimass::candle::{Device, Tensor};
use aimass::ssl::{label_subset, probe_features, ProbeConfig, Spread};
use aimass::train::{knn_accuracy, logistic_regression, KnnConfig, LogisticRegressionConfig};
use aimass::Error;
use serde_json::Value;

fn fixture() -> Value {
    let text = std::fs::read_to_string("tests/fixtures/probe.json").unwrap();
    serde_json::from_str(&text).unwrap()
}

fn matrix(v: &Value) -> Tensor {
    let rows: Vec<Vec<f32>> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect();
    let (n, d) = (rows.len(), rows[0].len());
    Tensor::from_vec(rows.concat(), (n, d), &Device::Cpu).unwrap()
}

fn labels(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn logistic_regression_matches_torch_lbfgs() {
    for (name, case) in fixture().as_object().unwrap() {
        let (tx, ty) = (matrix(&case["train_x"]), labels(&case["train_y"]));
        let (vx, vy) = (matrix(&case["test_x"]), labels(&case["test_y"]));
        let r =
            logistic_regression(&tx, &ty, &vx, &vy, &LogisticRegressionConfig::default()).unwrap();
        let want_loss = case["loss"].as_f64().unwrap();
        assert!(
            (r.loss - want_loss).abs() < 1e-4 * want_loss.max(1.0),
            "{name}: loss {} vs torch {want_loss}",
            r.loss
        );
        assert!(
            (r.test_acc - case["test_acc"].as_f64().unwrap()).abs() < 1e-9,
            "{name}: accuracy {}",
            r.test_acc
        );
        // The optimum is unique (strictly convex with weight decay): the
        // weights agree up to the stopping tolerances.
        let w = r.weight.to_vec2::<f32>().unwrap();
        for (i, row) in case["weight"].as_array().unwrap().iter().enumerate() {
            for (j, x) in row.as_array().unwrap().iter().enumerate() {
                let x = x.as_f64().unwrap();
                assert!(
                    (w[i][j] as f64 - x).abs() < 2e-2 * x.abs().max(1.0),
                    "{name}: W[{i}][{j}] {} vs {x}",
                    w[i][j]
                );
            }
        }
        assert!(
            r.iterations >= 1 && r.iterations <= 500,
            "{name}: {} iterations",
            r.iterations
        );
    }
}

#[test]
fn logistic_regression_bad_inputs() {
    let x = Tensor::new(&[[1.0f32, 0.0], [0.0, 1.0], [1.0, 1.0]], &Device::Cpu).unwrap();
    let cfg = LogisticRegressionConfig::default();
    // Fewer labels than rows.
    assert!(matches!(
        logistic_regression(&x, &[0, 1], &x, &[0, 1, 0], &cfg),
        Err(Error::Shape { .. })
    ));
    // Test features of another width.
    let bad = Tensor::new(&[[1.0f32, 0.0, 2.0]], &Device::Cpu).unwrap();
    assert!(matches!(
        logistic_regression(&x, &[0, 1, 0], &bad, &[0], &cfg),
        Err(Error::Shape { .. })
    ));
    // A test label outside the classes given.
    let e = logistic_regression(
        &x,
        &[0, 1, 0],
        &x,
        &[0, 1, 2],
        &cfg.clone().with_num_classes(2),
    )
    .unwrap_err();
    assert!(e.to_string().contains("num_classes"), "{e}");
    // Bad settings name their field.
    let e = logistic_regression(
        &x,
        &[0, 1, 0],
        &x,
        &[0, 1, 0],
        &cfg.clone().with_max_iter(0),
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("LogisticRegressionConfig::max_iter"),
        "{e}"
    );
    let e = logistic_regression(&x, &[0, 1, 0], &x, &[0, 1, 0], &cfg.with_weight_decay(-1.0))
        .unwrap_err();
    assert!(e.to_string().contains("weight_decay"), "{e}");
}

#[test]
fn label_subsets_are_balanced_distinct_and_seeded() {
    let y: Vec<u32> = (0..300).map(|i| (i * 7 % 3) as u32).collect();
    let a = label_subset(&y, 10, 0).unwrap();
    assert_eq!(a.len(), 30);
    for c in 0..3u32 {
        let picks: Vec<usize> = a[c as usize * 10..(c as usize + 1) * 10].to_vec();
        assert!(picks.iter().all(|&i| y[i] == c), "class order");
        let mut s = picks.clone();
        s.sort();
        s.dedup();
        assert_eq!(s.len(), 10, "without replacement");
    }
    assert_eq!(a, label_subset(&y, 10, 0).unwrap());
    assert_ne!(a, label_subset(&y, 10, 1).unwrap());
    // Every image of a class when asked for all of them.
    let all = label_subset(&y, 100, 3).unwrap();
    assert_eq!(all.len(), 300);
    let e = label_subset(&y, 101, 0).unwrap_err();
    assert!(e.to_string().contains("class 0 has 100 images"), "{e}");
}

#[test]
fn spread_is_the_population_std() {
    let s = Spread::of(vec![0.6, 0.8]);
    assert!((s.mean - 0.7).abs() < 1e-12);
    assert!((s.std - 0.1).abs() < 1e-12);
}

#[test]
fn probe_suite_runs_each_probe_on_each_subset() {
    let f = fixture();
    let case = &f["overlap"];
    let (tx, ty) = (matrix(&case["train_x"]), labels(&case["train_y"]));
    let (vx, vy) = (matrix(&case["test_x"]), labels(&case["test_y"]));
    let cfg = ProbeConfig::default()
        .with_labels_per_class(vec![5, 2])
        .with_subsets(3)
        .with_seed(4);
    let r = probe_features(&tx, &ty, &vx, &vy, &cfg).unwrap();
    // The full-data figures are the plain kNN and logistic regression.
    assert_eq!(
        r.knn_all,
        knn_accuracy(&tx, &ty, &vx, &vy, &KnnConfig::default()).unwrap()
    );
    assert!((r.linear_all - case["test_acc"].as_f64().unwrap()).abs() < 1e-9);
    assert_eq!(r.few.len(), 2);
    // Subset s of budget n is `label_subset(labels, n, seed + s)`.
    let five = r.at(5).unwrap();
    assert_eq!(five.linear.values.len(), 3);
    for s in 0..3 {
        let idx = label_subset(&ty, 5, 4 + s).unwrap();
        let ids = Tensor::new(
            idx.iter().map(|&i| i as u32).collect::<Vec<_>>(),
            &Device::Cpu,
        )
        .unwrap();
        let sy: Vec<u32> = idx.iter().map(|&i| ty[i]).collect();
        let sx = tx.index_select(&ids, 0).unwrap();
        let lin =
            logistic_regression(&sx, &sy, &vx, &vy, &LogisticRegressionConfig::default()).unwrap();
        assert_eq!(five.linear.values[s as usize], lin.test_acc);
        assert_eq!(
            five.knn.values[s as usize],
            knn_accuracy(&sx, &sy, &vx, &vy, &KnnConfig::default()).unwrap()
        );
    }
    assert_eq!(five.linear, Spread::of(five.linear.values.clone()));
    // Bad settings.
    assert!(probe_features(&tx, &ty, &vx, &vy, &ProbeConfig::default().with_subsets(0)).is_err());
    let e = probe_features(
        &tx,
        &ty,
        &vx,
        &vy,
        &ProbeConfig::default().with_labels_per_class(vec![0]),
    )
    .unwrap_err();
    assert!(e.to_string().contains("labels_per_class"), "{e}");
}
