//! The probe sweep's reports in the run directory: `results.csv` and `results.json` (one row per
//! configuration, encoder and seed), and `results.md`, a table laid out like Skluzacek's (2022)
//! Table 3.2 (hidden nodes, dropout, epochs, train and test accuracy) with test AUC and average
//! precision, their 95% bootstrap intervals, and the random-encoder baseline beside it; every value the
//! mean ± standard deviation over seeds. With several label columns the AUC and AP are the means over
//! columns (the Kaggle study-level metric is the mean AP); the CSV has every column's own.
//!
//! Skluzacek (2022): T. Skluzacek, *An Analysis of Transfer Learning using the SimCLR Contrastive Learning
//! Framework*, University of Minnesota capstone report, 2022.

use std::collections::BTreeMap;

use simclr_common::metrics::mean_std;
use simclr_common::probe::{EncoderSource, ProbeOutcome};

use crate::run_dir::RunDir;

/// Writes the three files and returns the Markdown table.
pub fn write_probe_reports(
    run_dir: &RunDir,
    outcomes: &[ProbeOutcome],
    majority_rate: Option<f64>,
    label_note: Option<&str>,
) -> std::io::Result<String> {
    let mut sorted: Vec<&ProbeOutcome> = outcomes.iter().collect();
    sorted.sort_by_key(|o| o.task.id);
    run_dir.write_atomic("results.csv", csv(&sorted)?.as_bytes())?;
    let json = serde_json::to_vec_pretty(&sorted).map_err(std::io::Error::other)?;
    run_dir.write_atomic("results.json", &json)?;
    let table = markdown(&sorted, majority_rate, label_note);
    run_dir.write_atomic("results.md", table.as_bytes())?;
    Ok(table)
}

fn csv(outcomes: &[&ProbeOutcome]) -> std::io::Result<String> {
    // The label columns of a task that did not fail (a failed row has none).
    let columns: Vec<String> = outcomes
        .iter()
        .find(|o| o.error.is_none())
        .map(|o| o.classes.iter().map(|c| c.column.clone()).collect())
        .unwrap_or_default();
    let mut w = csv::Writer::from_writer(Vec::new());
    let mut header: Vec<String> = [
        "task",
        "encoder",
        "hidden",
        "dropout",
        "epochs",
        "finetune",
        "seed",
        "rank",
        "seconds",
        "train_loss",
        "train_accuracy",
        "test_loss",
        "test_accuracy",
        "mean_auc",
        "mean_average_precision",
        "mean_study_auc",
        "validation_mean_auc",
    ]
    .map(String::from)
    .to_vec();
    for c in &columns {
        for m in [
            "accuracy",
            "accuracy_lo",
            "accuracy_hi",
            "auc",
            "auc_lo",
            "auc_hi",
            "ap",
            "ap_lo",
            "ap_hi",
            "study_auc",
            "study_auc_lo",
            "study_auc_hi",
            "study_ap",
            "study_ap_lo",
            "study_ap_hi",
            "validation_auc",
        ] {
            header.push(format!("{c}:{m}"));
        }
    }
    header.push("error".into());
    w.write_record(&header)?;
    let num = |v: Option<f64>| v.map(|v| format!("{v:.6}")).unwrap_or_default();
    for o in outcomes {
        let t = &o.task;
        let last = o.last();
        let mut row = vec![
            t.id.to_string(),
            encoder_name(t.encoder).to_string(),
            t.hidden.to_string(),
            t.dropout.to_string(),
            t.epochs.to_string(),
            t.finetune.to_string(),
            t.seed.to_string(),
            o.rank.to_string(),
            format!("{:.3}", o.seconds),
            num(last.map(|p| p.train_loss)),
            num(last.map(|p| p.train_accuracy)),
            num(last.map(|p| p.test_loss)),
            num(last.map(|p| p.test_accuracy)),
            num(o.mean_over_classes(|c| c.auc)),
            num(o.mean_over_classes(|c| c.average_precision)),
            num(o.mean_over_classes(|c| c.study_auc)),
            num(o.validation_mean(|c| c.auc)),
        ];
        // A value and its interval's ends.
        let with_interval =
            |v: Option<f64>, ci: Option<(f64, f64)>| [num(v), num(ci.map(|i| i.0)), num(ci.map(|i| i.1))];
        for (k, c) in o.classes.iter().enumerate() {
            for cells in [
                with_interval(Some(c.accuracy), c.accuracy_ci),
                with_interval(c.auc, c.auc_ci),
                with_interval(c.average_precision, c.average_precision_ci),
                with_interval(c.study_auc, c.study_auc_ci),
                with_interval(c.study_average_precision, c.study_average_precision_ci),
            ] {
                row.extend(cells);
            }
            row.push(num(o.validation.get(k).and_then(|v| v.auc)));
        }
        // A failed row: its class columns empty, its reason in the last one.
        row.resize(header.len() - 1, String::new());
        row.push(o.error.clone().unwrap_or_default());
        w.write_record(&row)?;
    }
    let bytes = w.into_inner().map_err(|e| std::io::Error::other(e.to_string()))?;
    String::from_utf8(bytes).map_err(std::io::Error::other)
}

fn encoder_name(e: EncoderSource) -> &'static str {
    match e {
        EncoderSource::Simclr => "simclr",
        EncoderSource::Random => "random",
    }
}

/// "0.712 ± 0.031" over the seeds' values; "–" when none is defined.
fn summarise(values: &[Option<f64>]) -> String {
    let defined: Vec<f64> = values.iter().flatten().copied().collect();
    if defined.is_empty() {
        return "–".into();
    }
    let (mean, sd) = mean_std(&defined);
    format!("{mean:.3} ± {sd:.3}")
}

/// The mean interval over seeds, "[lo, hi]".
fn interval(values: &[Option<(f64, f64)>]) -> String {
    let defined: Vec<(f64, f64)> = values.iter().flatten().copied().collect();
    if defined.is_empty() {
        return String::new();
    }
    let n = defined.len() as f64;
    let lo = defined.iter().map(|i| i.0).sum::<f64>() / n;
    let hi = defined.iter().map(|i| i.1).sum::<f64>() / n;
    format!(" [{lo:.3}, {hi:.3}]")
}

/// The per-class mean of an interval bound, for tables over several columns.
fn mean_interval(
    o: &ProbeOutcome,
    ci: impl Fn(&simclr_common::probe::ClassOutcome) -> Option<(f64, f64)>,
) -> Option<(f64, f64)> {
    let lo = o.mean_over_classes(|c| ci(c).map(|i| i.0))?;
    let hi = o.mean_over_classes(|c| ci(c).map(|i| i.1))?;
    Some((lo, hi))
}

/// (hidden units, dropout's bits, epochs, fine-tuned): a configuration, without encoder and seed.
pub(crate) type ConfigKey = (i64, u64, usize, bool);

/// The outcomes by configuration (in the order of the sweep) and encoder, each group the seeds' runs.
pub(crate) struct Grouped<'a> {
    pub order: Vec<ConfigKey>,
    pub groups: BTreeMap<(ConfigKey, EncoderSource), Vec<&'a ProbeOutcome>>,
}

impl<'a> Grouped<'a> {
    pub fn new(outcomes: &[&'a ProbeOutcome]) -> Grouped<'a> {
        let mut order: Vec<ConfigKey> = Vec::new();
        let mut groups: BTreeMap<(ConfigKey, EncoderSource), Vec<&ProbeOutcome>> = BTreeMap::new();
        for o in outcomes {
            let key = (o.task.hidden, o.task.dropout.to_bits(), o.task.epochs, o.task.finetune);
            if !order.contains(&key) {
                order.push(key);
            }
            groups.entry((key, o.task.encoder)).or_default().push(o);
        }
        Grouped { order, groups }
    }

    pub fn runs(&self, key: ConfigKey, encoder: EncoderSource) -> &[&'a ProbeOutcome] {
        self.groups.get(&(key, encoder)).map_or(&[], Vec::as_slice)
    }

    /// The mean and standard deviation over seeds of a run's metric (None if no run defines it).
    pub fn mean_std(
        &self,
        key: ConfigKey,
        encoder: EncoderSource,
        metric: impl Fn(&ProbeOutcome) -> Option<f64>,
    ) -> Option<(f64, f64)> {
        let values: Vec<f64> = self.runs(key, encoder).iter().filter_map(|o| metric(o)).collect();
        (!values.is_empty()).then(|| mean_std(&values))
    }

    /// The configuration of `encoder` with the highest mean validation AUC (mean over label columns
    /// and seeds), with that AUC; None without validation metrics. The test split chooses nothing.
    pub fn chosen(&self, encoder: EncoderSource) -> Option<(ConfigKey, f64)> {
        let mut best: Option<(ConfigKey, f64)> = None;
        for &key in &self.order {
            if let Some((auc, _)) = self.mean_std(key, encoder, |o| o.validation_mean(|c| c.auc)) {
                if best.is_none_or(|(_, b)| auc > b) {
                    best = Some((key, auc));
                }
            }
        }
        best
    }

    /// The configuration the figures show: the SimCLR encoder's chosen one, else the sweep's first
    /// with a SimCLR run; None without SimCLR runs.
    pub fn shown(&self) -> Option<ConfigKey> {
        self.chosen(EncoderSource::Simclr)
            .map(|(k, _)| k)
            .or_else(|| self.order.iter().copied().find(|&k| !self.runs(k, EncoderSource::Simclr).is_empty()))
    }
}

/// "500 hidden, dropout 20%, 30 epochs" / "linear, 30 epochs".
pub(crate) fn describe(key: ConfigKey) -> String {
    let (hidden, dropout, epochs) = (key.0, f64::from_bits(key.1), key.2);
    let probe = match (hidden, dropout) {
        (0, _) => format!("linear, {epochs} epochs"),
        (h, 0.0) => format!("{h} hidden, no dropout, {epochs} epochs"),
        (h, d) => format!("{h} hidden, dropout {}%, {epochs} epochs", d * 100.0),
    };
    if key.3 {
        format!("{probe}, fine-tuned")
    } else {
        probe
    }
}

fn markdown(outcomes: &[&ProbeOutcome], majority_rate: Option<f64>, label_note: Option<&str>) -> String {
    let (failed, succeeded): (Vec<&ProbeOutcome>, Vec<&ProbeOutcome>) =
        outcomes.iter().partition(|o| o.error.is_some());
    let grouped = Grouped::new(&succeeded);
    let (order, groups) = (&grouped.order, &grouped.groups);
    let has_random = groups.keys().any(|(_, e)| *e == EncoderSource::Random);
    let mut out = String::from(
        "| hidden nodes | dropout | epochs | train accuracy | validation AUC | test accuracy | test AUC [95% CI] | test AP [95% CI] |",
    );
    if has_random {
        out.push_str(" random encoder: validation AUC | test AUC | test AP |");
    }
    out.push('\n');
    out.push_str("|---|---|---|---|---|---|---|---|");
    if has_random {
        out.push_str("---|---|---|");
    }
    out.push('\n');
    for key in order {
        let (hidden, dropout, epochs) = (key.0, f64::from_bits(key.1), key.2);
        let mut hidden_text = if hidden == 0 { "linear".to_string() } else { hidden.to_string() };
        if key.3 {
            hidden_text.push_str(" (fine-tuned)");
        }
        let dropout_text = if dropout == 0.0 { "none".to_string() } else { format!("{}%", dropout * 100.0) };
        let cells = |e: EncoderSource| -> Option<[String; 5]> {
            let runs = groups.get(&(*key, e))?;
            let pick = |f: &dyn Fn(&ProbeOutcome) -> Option<f64>| runs.iter().map(|o| f(o)).collect::<Vec<_>>();
            let auc = pick(&|o| o.mean_over_classes(|c| c.auc));
            let ap = pick(&|o| o.mean_over_classes(|c| c.average_precision));
            let auc_ci: Vec<_> = runs.iter().map(|o| mean_interval(o, |c| c.auc_ci)).collect();
            let ap_ci: Vec<_> = runs.iter().map(|o| mean_interval(o, |c| c.average_precision_ci)).collect();
            Some([
                summarise(&pick(&|o| o.last().map(|p| p.train_accuracy))),
                summarise(&pick(&|o| o.validation_mean(|c| c.auc))),
                summarise(&pick(&|o| o.last().map(|p| p.test_accuracy))),
                format!("{}{}", summarise(&auc), interval(&auc_ci)),
                format!("{}{}", summarise(&ap), interval(&ap_ci)),
            ])
        };
        let Some(ours) = cells(EncoderSource::Simclr) else { continue };
        out.push_str(&format!(
            "| {hidden_text} | {dropout_text} | {epochs} | {} | {} | {} | {} | {} |",
            ours[0], ours[1], ours[2], ours[3], ours[4]
        ));
        if has_random {
            match cells(EncoderSource::Random) {
                Some(r) => out.push_str(&format!(" {} | {} | {} |", r[1], r[3], r[4])),
                None => out.push_str(" – | – | – |"),
            }
        }
        out.push('\n');
    }
    out.push('\n');
    out.push_str(&chosen_summary(&grouped, has_random));
    // Every configuration's test AUC, averaged: a description of the sweep, not a choice.
    let overall = |e: EncoderSource| -> Option<(f64, f64)> {
        let per_config: Vec<(f64, f64)> =
            order.iter().filter_map(|&k| grouped.mean_std(k, e, |o| o.mean_over_classes(|c| c.auc))).collect();
        let n = per_config.len() as f64;
        (n > 0.0)
            .then(|| (per_config.iter().map(|m| m.0).sum::<f64>() / n, per_config.iter().map(|m| m.1).sum::<f64>() / n))
    };
    if let (Some(ours), Some(random)) = (overall(EncoderSource::Simclr), overall(EncoderSource::Random)) {
        out.push_str(&format!(
            "Mean test AUC over all configurations: SimCLR encoder {:.3}, random encoder {:.3} (difference {:+.3}; mean sd over seeds {:.3} and {:.3}).\n",
            ours.0,
            random.0,
            ours.0 - random.0,
            ours.1,
            random.1
        ));
    }
    if let Some(rate) = majority_rate {
        out.push_str(&format!("Majority-class rate on the test split: {rate:.3}.\n"));
    }
    if let Some(note) = label_note {
        out.push_str(note);
        out.push('\n');
    }
    if !failed.is_empty() {
        out.push_str(&format!(
            "{} of {} tasks failed and are left out of the table (their reasons are in results.csv):\n",
            failed.len(),
            outcomes.len()
        ));
        for o in &failed {
            let reason = o.error.as_deref().unwrap_or_default();
            out.push_str(&format!("- task {} ({}): {reason}\n", o.task.id, o.task.configuration()));
        }
    }
    out
}

/// The configurations chosen on validation AUC, one per encoder, and their test metrics, reported once:
/// image level and study level (a study's score the mean of its images'), with patient-level bootstrap
/// intervals; then the SimCLR-minus-random difference against the spread over probe seeds.
fn chosen_summary(grouped: &Grouped, has_random: bool) -> String {
    let mut out = String::new();
    let Some((ours, ours_validation)) = grouped.chosen(EncoderSource::Simclr) else {
        out.push_str(
            "No validation split (data.validation_fraction = 0): no configuration is chosen; the table describes the sweep.\n",
        );
        return out;
    };
    let stat = |key: ConfigKey, e: EncoderSource, f: &dyn Fn(&ProbeOutcome) -> Option<f64>| -> String {
        summarise(&grouped.runs(key, e).iter().map(|o| f(o)).collect::<Vec<_>>())
    };
    let ci = |key: ConfigKey, e: EncoderSource, f: &dyn Fn(&ProbeOutcome) -> Option<(f64, f64)>| -> String {
        interval(&grouped.runs(key, e).iter().map(|o| f(o)).collect::<Vec<_>>())
    };
    let columns = grouped.runs(ours, EncoderSource::Simclr).first().map_or(1, |o| o.classes.len());
    let (auc_name, ap_name) = if columns > 1 { ("mean AUC over columns", "mAP") } else { ("AUC", "AP") };
    let describe_test = |key: ConfigKey, e: EncoderSource| {
        format!(
            "image level {auc_name} {}{}, {ap_name} {}; study level {auc_name} {}{}, {ap_name} {}{}; accuracy {}",
            stat(key, e, &|o| o.mean_over_classes(|c| c.auc)),
            ci(key, e, &|o| mean_interval(o, |c| c.auc_ci)),
            stat(key, e, &|o| o.mean_over_classes(|c| c.average_precision)),
            stat(key, e, &|o| o.mean_over_classes(|c| c.study_auc)),
            ci(key, e, &|o| mean_interval(o, |c| c.study_auc_ci)),
            stat(key, e, &|o| o.mean_over_classes(|c| c.study_average_precision)),
            ci(key, e, &|o| mean_interval(o, |c| c.study_average_precision_ci)),
            stat(key, e, &|o| o.last().map(|p| p.test_accuracy)),
        )
    };
    let seeds = grouped.runs(ours, EncoderSource::Simclr).len();
    out.push_str(&format!(
        "Chosen on validation AUC (SimCLR encoder): {} (validation AUC {ours_validation:.3}). Test, reported once: {}.\n",
        describe(ours),
        describe_test(ours, EncoderSource::Simclr)
    ));
    let random = if has_random { grouped.chosen(EncoderSource::Random) } else { None };
    if let Some((theirs, theirs_validation)) = random {
        out.push_str(&format!(
            "Chosen on validation AUC (random encoder): {} (validation AUC {theirs_validation:.3}). Test: {}.\n",
            describe(theirs),
            describe_test(theirs, EncoderSource::Random)
        ));
        let auc = |key, e| grouped.mean_std(key, e, |o| o.mean_over_classes(|c| c.auc));
        if let (Some(a), Some(b)) = (auc(ours, EncoderSource::Simclr), auc(theirs, EncoderSource::Random)) {
            let verdict = difference_verdict(a.0 - b.0, a.1.max(b.1));
            out.push_str(&format!(
                "SimCLR minus random, test AUC of the configurations chosen on validation: {:+.3} (sd over probe seeds {:.3} and {:.3}; {verdict}).\n",
                a.0 - b.0,
                a.1,
                b.1
            ));
        }
    }
    out.push_str(&format!(
        "Values: mean ± sd over {seeds} probe seeds; [95% intervals]: bootstrap over patients (studies without PatientID count as their own), mean over seeds; study level: a study's score is the mean of its images'; AP: the step-wise sum over thresholds of recall gained x precision (scikit-learn's average_precision_score, not interpolated){}.\n",
        if columns > 1 { "; mAP: its mean over label columns, as the Kaggle study-level task averages over its four classes" } else { "" }
    ));
    out
}

/// Reads a difference of two encoders' test AUCs against the larger of their spreads over probe
/// seeds: a clear lead either way is one of more than twice that spread.
fn difference_verdict(difference: f64, spread: f64) -> &'static str {
    if difference > 2.0 * spread {
        "SimCLR ahead by more than twice the larger spread over probe seeds"
    } else if difference < -2.0 * spread {
        "the random encoder ahead by more than twice the larger spread over probe seeds"
    } else {
        "within twice the larger spread over probe seeds: not a clear difference"
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use simclr_common::probe::{ClassOutcome, EpochPoint, ProbeSection};

    /// An outcome of `task` with test AUC `auc` (AP 0.1 lower), flat curves and a 3-point ROC.
    pub(crate) fn outcome(task: simclr_common::probe::ProbeTask, auc: f64) -> ProbeOutcome {
        ProbeOutcome {
            rank: (task.id % 2) as u32,
            seconds: 1.5,
            curves: (1..=task.epochs)
                .map(|epoch| EpochPoint {
                    epoch,
                    train_loss: 0.5,
                    train_accuracy: 0.8,
                    test_loss: 0.6,
                    test_accuracy: 0.7,
                })
                .collect(),
            classes: vec![ClassOutcome {
                column: "Typical Appearance".into(),
                accuracy: 0.7,
                auc: Some(auc),
                average_precision: Some(auc - 0.1),
                accuracy_ci: Some((0.6, 0.8)),
                auc_ci: Some((auc - 0.05, auc + 0.05)),
                average_precision_ci: None,
                roc: vec![(0.0, 0.0), (0.2, 0.6), (1.0, 1.0)],
                study_auc: Some(auc + 0.01),
                study_auc_ci: Some((auc - 0.09, auc + 0.06)),
                ..ClassOutcome::default()
            }],
            // Validation ranks the configurations the other way round from test (a test-chosen
            // report would pick another row).
            validation: vec![ClassOutcome {
                column: "Typical Appearance".into(),
                auc: Some(1.5 - auc),
                ..ClassOutcome::default()
            }],
            task,
            error: None,
        }
    }

    #[test]
    fn every_task_is_one_row_and_the_table_summarises_the_seeds() {
        let section = ProbeSection { seeds: 2, ..ProbeSection::default() };
        let tasks = section.expand(0);
        // Seeds alternate 0.8 / 0.6 for the pretrained encoder, 0.5 for the random one; reported in
        // reverse order, as a work queue would deliver them.
        let outcomes: Vec<ProbeOutcome> = tasks
            .iter()
            .rev()
            .map(|t| {
                // One configuration tests best, and validates worst (the helper mirrors them).
                let bump = if (t.hidden, t.epochs) == (500, 25) && t.dropout > 0.0 { 0.1 } else { 0.0 };
                let auc = match t.encoder {
                    EncoderSource::Simclr if t.seed == 0 => 0.8,
                    EncoderSource::Simclr => 0.6,
                    EncoderSource::Random => 0.5,
                } + bump;
                outcome(t.clone(), auc)
            })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let run = RunDir::create(dir.path()).unwrap();
        let table = write_probe_reports(&run, &outcomes, Some(0.597), None).unwrap();

        let mut reader = csv::Reader::from_path(dir.path().join("results.csv")).unwrap();
        let ids: Vec<usize> = reader.records().map(|r| r.unwrap()[0].parse().unwrap()).collect();
        assert_eq!(ids, (0..tasks.len()).collect::<Vec<_>>(), "every task exactly once, in task order");
        let json: Vec<ProbeOutcome> =
            serde_json::from_slice(&std::fs::read(dir.path().join("results.json")).unwrap()).unwrap();
        assert_eq!(json.len(), tasks.len());

        // 15 configurations, one row each, pretrained and random side by side.
        let rows: Vec<&str> = table.lines().filter(|l| l.starts_with("| ") && !l.starts_with("| hidden")).collect();
        assert_eq!(rows.len(), 15, "{table}");
        let row = rows.iter().find(|r| r.starts_with("| 500 | 20% | 25 |")).unwrap();
        // AUC over the two seeds: mean 0.8, sample sd 0.141; interval the mean of [auc -+ 0.05].
        assert!(row.contains("0.800 ± 0.141 [0.750, 0.850]"), "{row}");
        assert!(row.contains("0.600 ± 0.000"), "{row}");
        assert!(rows[0].starts_with("| linear | none | 20 |"), "{}", rows[0]);
        assert!(table.contains("Majority-class rate on the test split: 0.597"), "{table}");
        // The choice is made on validation: not the row that tests best.
        assert!(
            table.contains("Chosen on validation AUC (SimCLR encoder): linear, 20 epochs (validation AUC 0.800)"),
            "{table}"
        );
        assert!(table.contains("Test, reported once: image level AUC 0.700 ± 0.141 [0.650, 0.750]"), "{table}");
        assert!(table.contains("study level AUC 0.710 ± 0.141 [0.610, 0.760]"), "{table}");
        assert!(
            table.contains("SimCLR minus random, test AUC of the configurations chosen on validation: +0.200"),
            "{table}"
        );
        assert!(table.contains("not a clear difference"), "{table}");
        assert_eq!(std::fs::read_to_string(dir.path().join("results.md")).unwrap(), table);
    }

    #[test]
    fn a_clear_difference_is_read_either_way() {
        assert!(difference_verdict(0.030, 0.010).starts_with("SimCLR ahead"));
        assert!(difference_verdict(-0.069, 0.008).starts_with("the random encoder ahead"));
        assert!(difference_verdict(0.015, 0.008).contains("not a clear difference"));
        assert!(difference_verdict(-0.015, 0.008).contains("not a clear difference"));
    }

    #[test]
    fn a_failed_task_is_a_row_with_its_reason_and_stays_out_of_the_table() {
        let tasks = ProbeSection::default().expand(0);
        let mut outcomes: Vec<ProbeOutcome> = tasks.iter().map(|t| outcome(t.clone(), 0.7)).collect();
        // The first task (its configuration's only SimCLR run at this seed) diverged.
        outcomes[0] = ProbeOutcome::failed(tasks[0].clone(), 1, 0.2, "non-finite loss at epoch 3".into());
        let dir = tempfile::tempdir().unwrap();
        let table = write_probe_reports(&RunDir::create(dir.path()).unwrap(), &outcomes, None, None).unwrap();

        let mut reader = csv::Reader::from_path(dir.path().join("results.csv")).unwrap();
        let header = reader.headers().unwrap().clone();
        assert_eq!(header.iter().next_back(), Some("error"));
        assert!(header.iter().any(|h| h == "Typical Appearance:auc"), "{header:?}");
        let column = |name: &str| header.iter().position(|h| h == name).unwrap();
        let rows: Vec<csv::StringRecord> = reader.records().map(|r| r.unwrap()).collect();
        assert_eq!(rows.len(), tasks.len(), "every task is a row, the failed one too");
        let failed = &rows[0];
        assert_eq!(&failed[failed.len() - 1], "non-finite loss at epoch 3");
        assert_eq!(&failed[header.iter().position(|h| h == "mean_auc").unwrap()], "");
        assert!(rows[1..].iter().all(|r| r[r.len() - 1].is_empty()));
        // Study level and validation beside the image level: 0.7 + 0.01, interval [0.61, 0.76]; 1.5 - 0.7.
        let row = &rows[1];
        let cells =
            ["Typical Appearance:study_auc", "Typical Appearance:study_auc_lo", "Typical Appearance:validation_auc"]
                .map(|name| row[column(name)].to_string());
        assert_eq!(cells, ["0.710000", "0.610000", "0.800000"].map(String::from), "{row:?}");

        assert!(table.contains("1 of 90 tasks failed"), "{table}");
        assert!(table.contains(&format!("- task 0 ({}): non-finite loss at epoch 3", tasks[0].configuration())));
        // Its configuration still has its other seeds' rows in the table.
        let rows: Vec<&str> = table.lines().filter(|l| l.starts_with("| ") && !l.starts_with("| hidden")).collect();
        assert_eq!(rows.len(), 15, "{table}");
    }
}
