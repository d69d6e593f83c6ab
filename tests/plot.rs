//! The loss-curve picture: metrics parsing (resumed runs, torn lines) and a real PNG.

use kiln::train::plot::{LossHistory, plot_losses};

#[test]
fn history_keeps_the_last_value_per_step_and_skips_torn_lines() {
    let text = r#"{"step":0,"train_loss":4.2,"lr":0.0}
{"step":1,"train_loss":3.9,"lr":0.1}
{"step":2,"train_loss":3.7,"lr":0.1}
{"step":2,"val_loss":3.8,"val_ppl":44.7,"train_loss":3.7}
{"step":2,"train_lo
{"step":2,"train_loss":3.6,"lr":0.1}
{"step":3,"train_loss":null}
"#;
    let h = LossHistory::from_jsonl(text);
    assert_eq!(h.train, vec![(0, 4.2), (1, 3.9), (2, 3.6)]);
    assert_eq!(h.val, vec![(2, 3.8)]);
}

#[test]
fn plot_writes_a_png_in_place() {
    let dir = std::env::temp_dir().join(format!("kiln-plot-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("loss.png");
    let history = LossHistory {
        train: (0..300)
            .map(|s| (s, 4.0 / (1.0 + s as f64 / 50.0) + 0.1 * (s as f64).sin()))
            .collect(),
        val: (1..=3)
            .map(|k| (100 * k, 4.0 / (1.0 + 2.0 * k as f64)))
            .collect(),
    };
    plot_losses(&path, &history, "test run").unwrap();
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    // IHDR: width and height, big-endian, at bytes 16..24.
    let be = |b: &[u8]| u32::from_be_bytes(b.try_into().unwrap());
    assert_eq!((be(&bytes[16..20]), be(&bytes[20..24])), (840, 480));
    // Three curves, axes and text compress to well over a blank canvas's few hundred bytes.
    assert!(
        bytes.len() > 10_000,
        "{} bytes: nothing drawn?",
        bytes.len()
    );
    assert!(
        !dir.join("loss.tmp.png").exists(),
        "temporary file left behind"
    );
    // An empty history still draws (a run's first evaluation may precede any train loss).
    plot_losses(&path, &LossHistory::default(), "empty").unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}
