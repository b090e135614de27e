//! The probed encoder's embeddings for the user's own analyses: rank 0 writes
//! `embeddings.safetensors` (features, image index, split, labels and the first two principal
//! components; worker/src/phase/probe.rs) into the run directory, and this module adds
//! `embeddings.csv`, which says what each row is (the image's SOP Instance UID, study, patient, split
//! and labels), and `plots/embeddings.{png,svg}`, the principal-component projection coloured by the
//! first target.
//!
//! It owns only those two files; it reads the safetensors file the worker wrote and never changes it.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::data_plan::PreparedData;
use crate::import::torch_file::{read_safetensors, DType, RawTensor};
use crate::run_dir::RunDir;

pub const EMBEDDINGS_FILE: &str = "embeddings.safetensors";
const SPLITS: [&str; 3] = ["train", "validation", "test"];

/// One row of the export: where it sits in the projection and what it is.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbeddedImage {
    pub image_index: usize,
    pub split: &'static str,
    pub projection: (f64, f64),
    /// The targets' values (0 or 1; NaN where the study has none).
    pub labels: Vec<f32>,
}

fn tensor<'a>(file: &'a BTreeMap<String, RawTensor>, name: &str, dtype: DType) -> Result<&'a RawTensor, String> {
    let t = file.get(name).ok_or_else(|| format!("{EMBEDDINGS_FILE} has no '{name}'"))?;
    if t.dtype != dtype {
        return Err(format!("{EMBEDDINGS_FILE}: '{name}' is {:?}, expected {dtype:?}", t.dtype));
    }
    Ok(t)
}

/// Reads the worker's file; every row must name an image of the dataset.
pub fn read_embeddings(bytes: &[u8], images: usize) -> Result<Vec<EmbeddedImage>, String> {
    let file = read_safetensors(bytes).map_err(|e| format!("{EMBEDDINGS_FILE}: {e}"))?;
    let ints = |t: &RawTensor| (0..t.numel()).map(|i| t.int_at(i)).collect::<Vec<i64>>();
    let index = ints(tensor(&file, "image_index", DType::I64)?);
    let split = ints(tensor(&file, "split", DType::I64)?);
    let labels_tensor = tensor(&file, "labels", DType::F32)?;
    let columns = labels_tensor.shape.get(1).copied().unwrap_or(0);
    let labels = labels_tensor.to_f32();
    let projection_tensor = tensor(&file, "projection", DType::F32)?;
    let dims = projection_tensor.shape.get(1).copied().unwrap_or(0);
    let projection = projection_tensor.to_f32();
    let n = index.len();
    if split.len() != n || labels.len() != n * columns || projection.len() != n * dims {
        return Err(format!("{EMBEDDINGS_FILE}: its tensors disagree on the number of rows ({n})"));
    }
    (0..n)
        .map(|i| {
            let image_index = usize::try_from(index[i])
                .ok()
                .filter(|&j| j < images)
                .ok_or_else(|| format!("{EMBEDDINGS_FILE}: row {i} names image {} of {images}", index[i]))?;
            let split = usize::try_from(split[i])
                .ok()
                .and_then(|s| SPLITS.get(s).copied())
                .ok_or_else(|| format!("{EMBEDDINGS_FILE}: row {i} has split {}", split[i]))?;
            let at = |k: usize| if k < dims { projection[i * dims + k] as f64 } else { 0.0 };
            Ok(EmbeddedImage {
                image_index,
                split,
                projection: (at(0), at(1)),
                labels: labels[i * columns..(i + 1) * columns].to_vec(),
            })
        })
        .collect()
}

/// Writes `embeddings.csv` and the projection plot if the worker wrote `embeddings.safetensors`;
/// returns the files written (none when there is no export).
pub fn write_embedding_reports(run_dir: &RunDir, data: &PreparedData) -> std::io::Result<Vec<PathBuf>> {
    let path = run_dir.path().join(EMBEDDINGS_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let images = &data.dataset.index.images;
    let rows = read_embeddings(&bytes, images.len()).map_err(std::io::Error::other)?;
    let names: Vec<&str> = data.targets.iter().map(|&t| data.dataset.label_columns[t].as_str()).collect();
    let mut csv = csv::Writer::from_writer(Vec::new());
    let mut header = vec!["row", "sop_instance_uid", "study_instance_uid", "patient_id", "split", "path"];
    header.extend(names.iter().copied());
    let fail = |e: csv::Error| std::io::Error::other(e.to_string());
    csv.write_record(&header).map_err(fail)?;
    for (row, r) in rows.iter().enumerate() {
        let image = &images[r.image_index];
        let mut record = vec![
            row.to_string(),
            image.sop_uid.clone(),
            image.study_uid.clone(),
            image.patient_id.clone().unwrap_or_default(),
            r.split.to_string(),
            image.path.display().to_string(),
        ];
        record.extend(r.labels.iter().map(|v| if v.is_finite() { format!("{v}") } else { String::new() }));
        csv.write_record(&record).map_err(fail)?;
    }
    let text = csv.into_inner().map_err(|e| std::io::Error::other(e.to_string()))?;
    run_dir.write_atomic("embeddings.csv", &text)?;
    let mut written = vec![run_dir.path().join("embeddings.csv")];
    written.extend(write_projection_plot(run_dir, &rows, names.first().copied())?);
    Ok(written)
}

/// The projection coloured by the first target: positive, negative, and images without a label.
fn write_projection_plot(
    run_dir: &RunDir,
    rows: &[EmbeddedImage],
    target: Option<&str>,
) -> std::io::Result<Vec<PathBuf>> {
    use crate::plots::{write_scatter, ScatterGroup};
    use plotters::style::RGBColor;
    let target = target.unwrap_or("label");
    let mut groups = vec![
        ScatterGroup { label: format!("{target}: no"), color: RGBColor(31, 119, 180), points: Vec::new() },
        ScatterGroup { label: format!("{target}: yes"), color: RGBColor(214, 39, 40), points: Vec::new() },
        ScatterGroup { label: "unlabelled".into(), color: RGBColor(127, 127, 127), points: Vec::new() },
    ];
    for r in rows {
        let group = match r.labels.first() {
            Some(v) if v.is_finite() => usize::from(*v >= 0.5),
            _ => 2,
        };
        groups[group].points.push(r.projection);
    }
    groups.retain(|g| !g.points.is_empty());
    let caption = format!("embeddings of {} images, first two principal components", rows.len());
    write_scatter(run_dir, "embeddings", &caption, ("principal component 1", "principal component 2"), &groups)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(index: &[i64], split: &[i64], labels: &[f32], projection: &[f32]) -> Vec<u8> {
        use safetensors::tensor::TensorView;
        let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let ints = |v: &[i64]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let (i, s, l, p) = (ints(index), ints(split), bytes(labels), bytes(projection));
        let n = index.len();
        let views = vec![
            ("image_index", TensorView::new(safetensors::Dtype::I64, vec![n], &i).unwrap()),
            ("split", TensorView::new(safetensors::Dtype::I64, vec![split.len()], &s).unwrap()),
            ("labels", TensorView::new(safetensors::Dtype::F32, vec![n, 1], &l).unwrap()),
            ("projection", TensorView::new(safetensors::Dtype::F32, vec![n, 2], &p).unwrap()),
        ];
        safetensors::tensor::serialize(views, &None).unwrap()
    }

    #[test]
    fn rows_are_read_with_their_split_and_checked_against_the_dataset() {
        let bytes = file(&[4, 1, 2], &[0, 1, 2], &[1.0, 0.0, f32::NAN], &[0.5, -1.0, 2.0, 0.0, -3.0, 1.5]);
        let rows = read_embeddings(&bytes, 5).unwrap();
        assert_eq!(rows.len(), 3);
        assert_eq!((rows[0].image_index, rows[0].split, rows[0].projection), (4, "train", (0.5, -1.0)));
        assert_eq!((rows[2].split, rows[2].projection), ("test", (-3.0, 1.5)));
        assert!(rows[2].labels[0].is_nan());
        let e = read_embeddings(&bytes, 4).unwrap_err();
        assert!(e.contains("row 0 names image 4 of 4"), "{e}");
        let e = read_embeddings(&file(&[0, 1, 2], &[0, 1], &[1.0, 0.0, 1.0], &[0.0; 6]), 5).unwrap_err();
        assert!(e.contains("disagree"), "{e}");
        let e = read_embeddings(&file(&[0], &[3], &[1.0], &[0.0; 2]), 5).unwrap_err();
        assert!(e.contains("split 3"), "{e}");
    }
}
