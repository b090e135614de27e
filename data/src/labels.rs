//! Label tables: the SIIM-FISABIO-RSNA Kaggle `train_study_level.csv` (one row per study, the four
//! class columns), or a plain `labels.csv` (`path` relative to the dataset root, then label columns),
//! or none (unlabelled data, for pretraining only). Rows are checked as they are read; a bad row is an
//! error that names the file, the line and the column.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::phantom::StudyClass;

pub const SIIM_STUDY_CSV: &str = "train_study_level.csv";
pub const SIIM_IMAGE_CSV: &str = "train_image_level.csv";
pub const PLAIN_LABELS_CSV: &str = "labels.csv";

#[derive(Debug, thiserror::Error)]
pub enum LabelError {
    #[error("{path}: {source}")]
    Csv { path: PathBuf, source: csv::Error },
    #[error("{path} line {line}: {message}")]
    Row { path: PathBuf, line: u64, message: String },
    #[error("{path}: missing column '{column}' (columns: {found})")]
    Column { path: PathBuf, column: String, found: String },
}

/// Where the labels come from, and the label of each key (a study UID or a relative image path).
#[derive(Debug, Clone, PartialEq)]
pub enum LabelTable {
    /// Kaggle SIIM layout: study UID -> one value per class column.
    Siim {
        columns: Vec<String>,
        studies: BTreeMap<String, Vec<f32>>,
        path: PathBuf,
    },
    /// `labels.csv`: relative image path -> one value per label column.
    Plain {
        columns: Vec<String>,
        images: BTreeMap<PathBuf, Vec<f32>>,
        path: PathBuf,
    },
    Unlabelled,
}

impl LabelTable {
    /// Reads whichever label table `root` holds (SIIM first, then labels.csv).
    pub fn load(root: &Path) -> Result<LabelTable, LabelError> {
        let siim = root.join(SIIM_STUDY_CSV);
        if siim.is_file() {
            return read_siim(&siim);
        }
        let plain = root.join(PLAIN_LABELS_CSV);
        if plain.is_file() {
            return read_plain(&plain);
        }
        Ok(LabelTable::Unlabelled)
    }

    pub fn columns(&self) -> &[String] {
        match self {
            LabelTable::Siim { columns, .. } | LabelTable::Plain { columns, .. } => columns,
            LabelTable::Unlabelled => &[],
        }
    }
}

fn open(path: &Path) -> Result<csv::Reader<std::fs::File>, LabelError> {
    csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_path(path)
        .map_err(|source| LabelError::Csv { path: path.to_path_buf(), source })
}

fn parse_value(path: &Path, line: u64, column: &str, text: &str) -> Result<f32, LabelError> {
    match text.parse::<f32>() {
        Ok(v) if v.is_finite() => Ok(v),
        _ => Err(LabelError::Row {
            path: path.to_path_buf(),
            line,
            message: format!("column '{column}': '{text}' is not a number"),
        }),
    }
}

fn read_siim(path: &Path) -> Result<LabelTable, LabelError> {
    let mut reader = open(path)?;
    let headers = reader.headers().map_err(|source| LabelError::Csv { path: path.to_path_buf(), source })?.clone();
    let find = |name: &str| {
        headers.iter().position(|h| h == name).ok_or_else(|| LabelError::Column {
            path: path.to_path_buf(),
            column: name.to_string(),
            found: headers.iter().collect::<Vec<_>>().join(", "),
        })
    };
    let id = find("id")?;
    let columns: Vec<String> = StudyClass::ALL.iter().map(|c| c.column().to_string()).collect();
    let positions: Vec<usize> = columns.iter().map(|c| find(c)).collect::<Result<_, _>>()?;
    let mut studies = BTreeMap::new();
    for record in reader.records() {
        let record = record.map_err(|source| LabelError::Csv { path: path.to_path_buf(), source })?;
        let line = record.position().map(|p| p.line()).unwrap_or_default();
        let raw_id = record.get(id).unwrap_or_default();
        let study = raw_id.strip_suffix("_study").ok_or_else(|| LabelError::Row {
            path: path.to_path_buf(),
            line,
            message: format!("id '{raw_id}' does not end in '_study'"),
        })?;
        let values = positions
            .iter()
            .zip(&columns)
            .map(|(&p, c)| parse_value(path, line, c, record.get(p).unwrap_or_default()))
            .collect::<Result<Vec<_>, _>>()?;
        if studies.insert(study.to_string(), values).is_some() {
            return Err(LabelError::Row {
                path: path.to_path_buf(),
                line,
                message: format!("study {study} listed twice"),
            });
        }
    }
    Ok(LabelTable::Siim { columns, studies, path: path.to_path_buf() })
}

fn read_plain(path: &Path) -> Result<LabelTable, LabelError> {
    let mut reader = open(path)?;
    let headers = reader.headers().map_err(|source| LabelError::Csv { path: path.to_path_buf(), source })?.clone();
    if headers.get(0) != Some("path") || headers.len() < 2 {
        return Err(LabelError::Column {
            path: path.to_path_buf(),
            column: "path (first), then one column per label".into(),
            found: headers.iter().collect::<Vec<_>>().join(", "),
        });
    }
    let columns: Vec<String> = headers.iter().skip(1).map(str::to_string).collect();
    let mut images = BTreeMap::new();
    for record in reader.records() {
        let record = record.map_err(|source| LabelError::Csv { path: path.to_path_buf(), source })?;
        let line = record.position().map(|p| p.line()).unwrap_or_default();
        let image = PathBuf::from(record.get(0).unwrap_or_default());
        let values = columns
            .iter()
            .enumerate()
            .map(|(i, c)| parse_value(path, line, c, record.get(i + 1).unwrap_or_default()))
            .collect::<Result<Vec<_>, _>>()?;
        if images.insert(image.clone(), values).is_some() {
            return Err(LabelError::Row {
                path: path.to_path_buf(),
                line,
                message: format!("{} listed twice", image.display()),
            });
        }
    }
    Ok(LabelTable::Plain { columns, images, path: path.to_path_buf() })
}
