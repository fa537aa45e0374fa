//! Many images in one run: which files, where each result goes, and running
//! them concurrently over one connection with progress and a summary.
//!
//! [`plan`] is pure path logic (plus reading directories): it decides every
//! output before anything is sent, so a name clash or an output that cannot
//! be written is a usage error, not a half-done batch. [`run`] executes a
//! plan: existing outputs are skipped unless `overwrite`, each result is
//! written atomically (never a partial file), and a failure stops the batch
//! (jobs in flight finish) unless `continue_on_error`.

use std::{
    collections::HashMap,
    io::IsTerminal,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use indicatif::{ProgressBar, ProgressStyle};
use thiserror::Error;
use tokio::task::JoinSet;

use super::{
    Api, ClientError, Op,
    balance::Balancer,
    error_chain,
    image_io::{self, ImageFileError},
};
use crate::imagefile::{DecodeOptions, EncodeOptions, Encoding};

/// One input file and where its result goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Job {
    pub input: PathBuf,
    pub output: PathBuf,
    pub encoding: Encoding,
}

/// What a command line asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// One file to one file (`--input a.png --output b.png`): the original
    /// form, which replaces an existing output like `cp` does.
    pub single: bool,
    pub jobs: Vec<Job>,
}

#[derive(Debug, Error)]
pub enum PlanError {
    #[error("cannot read input {path}")]
    Input {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--output {path} is a file, but several inputs or a directory need an output directory")]
    OutputNotDirectory { path: PathBuf },
    #[error("{first} and {second} would both be written to {output}")]
    Clash { first: PathBuf, second: PathBuf, output: PathBuf },
    #[error(transparent)]
    Output(#[from] ImageFileError),
}

/// Decides every job. One input file and an output that is not a directory
/// is the single-file form; otherwise `output` is a directory (made if
/// missing) that receives each file under its name, or under its path
/// relative to the input directory it was found in. The extension becomes
/// `format`'s if given, else it is kept (a GIF, which is not written,
/// becomes `.png`).
pub fn plan(inputs: &[PathBuf], output: &Path, format: Option<Encoding>) -> Result<Plan, PlanError> {
    fn input_error(path: &Path) -> impl FnOnce(std::io::Error) -> PlanError + '_ {
        move |source| PlanError::Input { path: path.to_path_buf(), source }
    }
    if let [input] = inputs {
        let is_dir = std::fs::metadata(input).map_err(input_error(input))?.is_dir();
        if !is_dir && !output.is_dir() {
            let encoding = match format {
                Some(f) => f,
                None => image_io::output_format(output)?,
            };
            return Ok(Plan { single: true, jobs: vec![Job { input: input.clone(), output: output.to_path_buf(), encoding }] });
        }
    }
    if output.exists() && !output.is_dir() {
        return Err(PlanError::OutputNotDirectory { path: output.to_path_buf() });
    }
    // An output directory inside an input directory is not walked.
    let skip_dir = std::fs::canonicalize(output).ok();
    let mut jobs = Vec::new();
    let mut taken: HashMap<PathBuf, PathBuf> = HashMap::new();
    for input in inputs {
        let found: Vec<(PathBuf, PathBuf)> = if std::fs::metadata(input).map_err(input_error(input))?.is_dir() {
            let mut files = Vec::new();
            walk(input, skip_dir.as_deref(), &mut files).map_err(input_error(input))?;
            files.sort();
            files
                .into_iter()
                .map(|f| {
                    let relative = f.strip_prefix(input).unwrap_or(&f).to_path_buf();
                    (f, relative)
                })
                .collect()
        } else {
            let name = input.file_name().map(PathBuf::from).unwrap_or_else(|| input.clone());
            vec![(input.clone(), name)]
        };
        for (file, relative) in found {
            let (encoding, out) = output_for(&relative, format);
            let out = output.join(out);
            if let Some(first) = taken.insert(out.clone(), file.clone()) {
                return Err(PlanError::Clash { first, second: file, output: out });
            }
            jobs.push(Job { input: file, output: out, encoding });
        }
    }
    Ok(Plan { single: false, jobs })
}

/// The encoding and relative output path of a relative input path.
fn output_for(relative: &Path, format: Option<Encoding>) -> (Encoding, PathBuf) {
    let kept = relative.extension().and_then(|e| e.to_str()).and_then(Encoding::from_extension).filter(|e| e.can_encode());
    match (format, kept) {
        (Some(f), _) => (f, relative.with_extension(f.extension())),
        (None, Some(kept)) => (kept, relative.to_path_buf()),
        (None, None) => (Encoding::Png, relative.with_extension(Encoding::Png.extension())),
    }
}

/// Image files (by extension) under `dir`, recursively. Symbolic links to
/// directories are not followed (no cycles); links to files are taken.
fn walk(dir: &Path, skip: Option<&Path>, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let kind = entry.file_type()?;
        if kind.is_dir() {
            if skip.is_some() && std::fs::canonicalize(&path).ok().as_deref() == skip {
                continue;
            }
            walk(&path, skip, out)?;
        } else if (kind.is_file() || (kind.is_symlink() && path.is_file()))
            && path.extension().and_then(|e| e.to_str()).and_then(Encoding::from_extension).is_some()
        {
            out.push(path);
        }
    }
    Ok(())
}

/// How to process each job.
#[derive(Clone, Debug)]
pub struct JobSettings {
    pub api: Api,
    pub ops: Vec<Op>,
    pub server_name: String,
    /// TIFF page and decoding limits for every input.
    pub decode: DecodeOptions,
    pub jpeg_quality: u8,
    /// Compression and streaming.
    pub call: super::CallOptions,
}

/// Why one job failed, with the exit code it deserves on its own.
#[derive(Debug, Error)]
pub enum JobError {
    #[error(transparent)]
    Input(ImageFileError),
    #[error(transparent)]
    Request(ClientError),
    #[error(transparent)]
    Output(ImageFileError),
    #[error("cannot create directory {path}")]
    Directory {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("image job failed unexpectedly: {0}")]
    Panicked(String),
}

impl JobError {
    /// 65 unreadable input, 69 server unreachable, 1 anything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Input(_) => 65,
            // The server is unreachable, or refused the connection (TLS).
            Self::Request(ClientError::Connect { .. } | ClientError::Address { .. }) => 69,
            Self::Request(ClientError::Status { code: tonic::Code::Unavailable | tonic::Code::Unknown, .. }) => 69,
            _ => 1,
        }
    }
}

/// Reads and decodes a job's input (converted for the legacy API, with a
/// note). CPU-bound: call it off the reactor.
pub fn read_input(job: &Job, settings: &JobSettings) -> Result<(super::RawImage, Option<String>), JobError> {
    let image = image_io::read_image_with(&job.input, &settings.decode).map_err(JobError::Input)?.image;
    Ok(match settings.api {
        Api::Legacy => image.for_legacy(),
        Api::V1 => (image, None),
    })
}

/// Sends `image` for `job` and writes the result atomically. Returns notes.
pub async fn finish(servers: &Balancer, job: &Job, image: super::RawImage, settings: &JobSettings) -> Result<Option<String>, JobError> {
    let (result, _) = servers.process_with(settings.api, &image, &settings.ops, &settings.call).await.map_err(JobError::Request)?;
    let job = job.clone();
    let options = EncodeOptions { encoding: job.encoding, jpeg_quality: settings.jpeg_quality };
    blocking(move || image_io::write_image(&job.output, &result, &options).map_err(JobError::Output)).await
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, JobError> + Send + 'static) -> Result<T, JobError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| JobError::Panicked(e.to_string()))?
}

/// One job from start to end.
async fn run_job(servers: Arc<Balancer>, job: Job, settings: Arc<JobSettings>, overwrite: bool) -> Outcome {
    if !overwrite && job.output.exists() {
        return Outcome::Skipped;
    }
    let result = async {
        if let Some(dir) = job.output.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| JobError::Directory { path: dir.to_path_buf(), source })?;
        }
        let (j, s) = (job.clone(), settings.clone());
        let (image, note) = blocking(move || read_input(&j, &s)).await?;
        let written = finish(&servers, &job, image, &settings).await?;
        Ok(note.into_iter().chain(written).collect())
    }
    .await;
    match result {
        Ok(notes) => Outcome::Done(notes),
        Err(e) => Outcome::Failed(e),
    }
}

enum Outcome {
    Done(Vec<String>),
    Skipped,
    Failed(JobError),
}

/// Counts at the end of a batch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub done: usize,
    pub failed: usize,
    pub skipped: usize,
    /// Not started because an earlier job failed (without `continue_on_error`).
    pub not_started: usize,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} done, {} failed, {} skipped", self.done, self.failed, self.skipped)?;
        if self.not_started > 0 {
            write!(f, ", {} not started after the failure (see --continue-on-error)", self.not_started)?;
        }
        Ok(())
    }
}

/// How a batch runs.
#[derive(Clone, Copy, Debug)]
pub struct RunOptions {
    /// Requests in flight at once, over the one connection.
    pub concurrency: usize,
    pub overwrite: bool,
    pub continue_on_error: bool,
}

/// Progress: a bar with count, throughput and ETA when stderr is a
/// terminal, else one plain line per file.
enum Progress {
    Bar(ProgressBar),
    Lines,
}

impl Progress {
    fn new(total: usize) -> Self {
        if !std::io::stderr().is_terminal() {
            return Self::Lines;
        }
        let bar = ProgressBar::new(total as u64);
        let style = ProgressStyle::with_template("{bar:30} {pos}/{len} images  {per_sec}  ETA {eta}  {wide_msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        bar.enable_steady_tick(Duration::from_millis(200));
        Self::Bar(bar)
    }

    fn line(&self, text: String) {
        match self {
            Self::Bar(bar) => bar.println(text),
            Self::Lines => eprintln!("{text}"),
        }
    }

    fn report(&self, job: &Job, outcome: &Outcome) {
        match outcome {
            Outcome::Done(notes) => {
                for note in notes {
                    self.line(format!("imgsvc-client: note: {note}"));
                }
                if let Self::Lines = self {
                    self.line(format!("done {} -> {}", job.input.display(), job.output.display()));
                }
            }
            Outcome::Skipped => self.line(format!("skipped {}: {} exists (see --overwrite)", job.input.display(), job.output.display())),
            Outcome::Failed(e) => self.line(format!("failed {}: {}", job.input.display(), error_chain(e))),
        }
        if let Self::Bar(bar) = self {
            bar.inc(1);
        }
    }

    fn finish(&self) {
        if let Self::Bar(bar) = self {
            bar.finish_and_clear();
        }
    }
}

/// Runs every job of `jobs` on `servers`, at most `concurrency` at once.
pub async fn run(servers: Arc<Balancer>, jobs: Vec<Job>, settings: JobSettings, options: RunOptions) -> Summary {
    let progress = Progress::new(jobs.len());
    let settings = Arc::new(settings);
    let mut summary = Summary::default();
    let mut running = JoinSet::new();
    let mut pending = jobs.into_iter();
    let mut stop = false;
    loop {
        while !stop && running.len() < options.concurrency.max(1) {
            let Some(job) = pending.next() else { break };
            let (servers, settings) = (servers.clone(), settings.clone());
            running.spawn(async move {
                let outcome = run_job(servers, job.clone(), settings, options.overwrite).await;
                (job, outcome)
            });
        }
        let Some(finished) = running.join_next().await else { break };
        let (job, outcome) = match finished {
            Ok(pair) => pair,
            Err(e) => {
                summary.failed += 1;
                progress.line(format!("failed: image job failed unexpectedly: {e}"));
                stop |= !options.continue_on_error;
                continue;
            }
        };
        progress.report(&job, &outcome);
        match outcome {
            Outcome::Done(_) => summary.done += 1,
            Outcome::Skipped => summary.skipped += 1,
            Outcome::Failed(_) => {
                summary.failed += 1;
                stop |= !options.continue_on_error;
            }
        }
    }
    summary.not_started = pending.count();
    progress.finish();
    summary
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(path: &Path) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, b"x").unwrap();
    }

    #[test]
    fn one_file_to_a_file_is_the_single_form_with_the_extension_s_encoding() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("a.png");
        touch(&input);
        let plan = plan(std::slice::from_ref(&input), &dir.path().join("b.webp"), None).unwrap();
        assert!(plan.single);
        assert_eq!(plan.jobs, [Job { input, output: dir.path().join("b.webp"), encoding: Encoding::WebP }]);
    }

    #[test]
    fn a_directory_maps_to_relative_paths_with_extensions_kept_or_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        for f in ["a.png", "sub/b.jpg", "sub/deeper/c.gif", "notes.txt"] {
            touch(&src.join(f));
        }
        let out = dir.path().join("out");
        let kept = plan(std::slice::from_ref(&src), &out, None).unwrap();
        assert!(!kept.single);
        let got: Vec<_> = kept.jobs.iter().map(|j| (j.output.strip_prefix(&out).unwrap().to_path_buf(), j.encoding)).collect();
        assert_eq!(
            got,
            [
                (PathBuf::from("a.png"), Encoding::Png),
                (PathBuf::from("sub/b.jpg"), Encoding::Jpeg),
                (PathBuf::from("sub/deeper/c.png"), Encoding::Png),
            ]
        );
        let tiff = plan(&[src], &out, Some(Encoding::Tiff)).unwrap();
        assert_eq!(tiff.jobs[1].output, out.join("sub/b.tif"));
    }

    #[test]
    fn two_inputs_with_one_output_name_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("x/a.png"), dir.path().join("y/a.png"));
        touch(&a);
        touch(&b);
        let err = plan(&[a, b], &dir.path().join("out"), None).unwrap_err();
        assert!(matches!(err, PlanError::Clash { .. }), "{err}");
    }

    #[test]
    fn several_inputs_need_an_output_directory() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, out) = (dir.path().join("a.png"), dir.path().join("b.png"), dir.path().join("out.png"));
        for p in [&a, &b, &out] {
            touch(p);
        }
        let err = plan(&[a, b], &out, None).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("--output {} is a file, but several inputs or a directory need an output directory", out.display())
        );
    }

    #[test]
    fn an_output_directory_inside_the_input_is_not_walked() {
        let dir = tempfile::tempdir().unwrap();
        touch(&dir.path().join("a.png"));
        touch(&dir.path().join("out/old.png"));
        let plan = plan(&[dir.path().to_path_buf()], &dir.path().join("out"), None).unwrap();
        assert_eq!(plan.jobs.len(), 1);
        assert_eq!(plan.jobs[0].output, dir.path().join("out/a.png"));
    }
}
