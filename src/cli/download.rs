//! `gigastt download`: fetch the real GigaAM v3 weights from Hugging Face into the
//! model dir, each file SHA-256 verified before it gets its final name.
//!
//! It exists because the weights (≈900 MB for the default RNN-T) can't ship in the
//! repository, and a half-written or tampered `.onnx` must never be loaded. Each file
//! streams into `FILE.part`, is hashed on the way, and is renamed to `FILE` only when
//! the hash matches. An interrupted transfer resumes from the `.part` (`Range:
//! bytes=N-`); the part is re-hashed first, so the final hash always covers the whole
//! file. Files already in place are re-hashed (a few seconds for the encoder) rather
//! than trusted by size: no sidecar cache to go stale.
//!
//! Where the expected hash comes from: the table below pins the default RNN-T files
//! (SPEC "Model"); pinned hashes always win. Other files use Hugging Face's
//! `X-Linked-Etag` header, which for LFS files is the content's SHA-256. With neither,
//! we refuse to install the file unless [`DownloadOptions::allow_unverified`] is set.
//!
//! Leaves out: parallel transfers, auth tokens (the repository is public), proxies,
//! retries within one run (running again resumes).

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use sha2::{Digest, Sha256};

/// Where the weights live: `{base}/{file}` (SPEC "Model").
pub const DEFAULT_BASE_URL: &str = "https://huggingface.co/istupakov/gigaam-v3-onnx/resolve/main";
/// The upstream Hugging Face repository, named in error messages.
pub const UPSTREAM_REPO: &str = "istupakov/gigaam-v3-onnx";
/// How long to wait for the TCP connection to a host (15 s).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long one socket read or write may stall before the transfer counts as
/// interrupted (30 s).
pub const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Most redirects followed per file (Hugging Face uses one, to its CDN).
pub const MAX_REDIRECTS: usize = 5;
/// Read buffer for streaming and hashing, in bytes.
const CHUNK_BYTES: usize = 256 * 1024;
/// Suffix of the file a transfer streams into before verification.
pub const PART_SUFFIX: &str = ".part";

/// Which set of files to fetch; the engine detects the variant from the files present.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ModelVariant {
    /// RNN-T, fp32: punctuated, capitalised text. All four files pinned.
    #[default]
    Rnnt,
    /// RNN-T with the int8 encoder (4x smaller); decoder, joint and vocab as `Rnnt`.
    RnntInt8,
    /// CTC, fp32.
    Ctc,
    /// CTC, int8.
    CtcInt8,
}

impl ModelVariant {
    /// Every variant, in the order help text lists them.
    pub const ALL: [ModelVariant; 4] = [Self::Rnnt, Self::RnntInt8, Self::Ctc, Self::CtcInt8];

    /// The name `--variant` takes.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rnnt => "rnnt",
            Self::RnntInt8 => "rnnt-int8",
            Self::Ctc => "ctc",
            Self::CtcInt8 => "ctc-int8",
        }
    }
}

impl fmt::Display for ModelVariant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A `--variant` value that names no variant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseVariantError(pub String);

impl fmt::Display for ParseVariantError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown model variant {:?} (rnnt, rnnt-int8, ctc or ctc-int8)",
            self.0
        )
    }
}

impl std::error::Error for ParseVariantError {}

impl FromStr for ModelVariant {
    type Err = ParseVariantError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|v| v.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| ParseVariantError(s.to_owned()))
    }
}

/// One file of the upstream repository and what we know of it in advance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteFile<'a> {
    /// File name, both upstream and in the model dir.
    pub name: &'a str,
    /// Pinned size in bytes, when known: a present file of another size is re-fetched.
    pub size_bytes: Option<u64>,
    /// Pinned SHA-256 (lowercase hex); wins over anything the server says.
    pub sha256: Option<&'a str>,
}

const RNNT_DECODER: RemoteFile<'static> = RemoteFile {
    name: "v3_e2e_rnnt_decoder.onnx",
    size_bytes: Some(4_599_910),
    sha256: Some("7b0a16d67fd2cb37061decc93c69e364a9ab27afee3c57495d55b1c974cf7231"),
};
const RNNT_JOINT: RemoteFile<'static> = RemoteFile {
    name: "v3_e2e_rnnt_joint.onnx",
    size_bytes: Some(2_712_896),
    sha256: Some("602ff7017a93311aad34df1437c8d7f49911353c13d6eae7a6ee7b041339465c"),
};
const RNNT_VOCAB: RemoteFile<'static> = RemoteFile {
    name: "v3_e2e_rnnt_vocab.txt",
    size_bytes: Some(13_354),
    sha256: Some("39abae20e692998290c574e606f11a9edef2902a1995463fcff63d1490cf22b7"),
};
const CTC_VOCAB: RemoteFile<'static> = unpinned("v3_e2e_ctc_vocab.txt");

/// A file whose hash comes from the server's `X-Linked-Etag`.
const fn unpinned(name: &'static str) -> RemoteFile<'static> {
    RemoteFile {
        name,
        size_bytes: None,
        sha256: None,
    }
}

/// Sizes and hashes: SPEC "Model".
const RNNT_FILES: [RemoteFile<'static>; 4] = [
    RemoteFile {
        name: "v3_e2e_rnnt_encoder.onnx",
        size_bytes: Some(885_084_534),
        sha256: Some("cd60b3764a832e8560ae6d3ad0b10adc1a42ffae412b9476f25620aae4f4a508"),
    },
    RNNT_DECODER,
    RNNT_JOINT,
    RNNT_VOCAB,
];
const RNNT_INT8_FILES: [RemoteFile<'static>; 4] = [
    unpinned("v3_e2e_rnnt_encoder_int8.onnx"),
    RNNT_DECODER,
    RNNT_JOINT,
    RNNT_VOCAB,
];
const CTC_FILES: [RemoteFile<'static>; 2] = [unpinned("v3_e2e_ctc.onnx"), CTC_VOCAB];
const CTC_INT8_FILES: [RemoteFile<'static>; 2] = [unpinned("v3_e2e_ctc_int8.onnx"), CTC_VOCAB];

/// The files that make up `variant`.
pub fn files(variant: ModelVariant) -> &'static [RemoteFile<'static>] {
    match variant {
        ModelVariant::Rnnt => &RNNT_FILES,
        ModelVariant::RnntInt8 => &RNNT_INT8_FILES,
        ModelVariant::Ctc => &CTC_FILES,
        ModelVariant::CtcInt8 => &CTC_INT8_FILES,
    }
}

/// What to fetch and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownloadOptions {
    /// Destination; created when missing.
    pub model_dir: PathBuf,
    /// Which files [`download`] fetches ([`download_files`] ignores it).
    pub variant: ModelVariant,
    /// `{base_url}/{file}` is fetched; [`DEFAULT_BASE_URL`] unless overridden.
    pub base_url: String,
    /// Install files for which no SHA-256 is known (neither pinned nor sent by the
    /// server) instead of failing. A known hash is always checked.
    pub allow_unverified: bool,
}

impl DownloadOptions {
    /// Default variant and upstream, verification required.
    pub fn new(model_dir: impl Into<PathBuf>) -> DownloadOptions {
        DownloadOptions {
            model_dir: model_dir.into(),
            variant: ModelVariant::default(),
            base_url: DEFAULT_BASE_URL.to_owned(),
            allow_unverified: false,
        }
    }
}

/// What a file is going through; sent to the progress callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Hashing bytes already on disk (a present file, or a `.part` before resuming).
    Checking,
    /// A transfer began; `done_bytes` is where it resumes (0 for a fresh start).
    Started,
    /// Bytes arrived.
    Downloading,
    /// Verified and renamed into place.
    Installed,
    /// Already present with the right hash: nothing fetched.
    AlreadyPresent,
}

/// One progress event. `done_bytes`/`total_bytes` count the whole file, resumed part included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress<'a> {
    /// File name.
    pub file: &'a str,
    /// What is happening.
    pub stage: Stage,
    /// Bytes hashed or present so far.
    pub done_bytes: u64,
    /// File size, when known.
    pub total_bytes: Option<u64>,
}

/// The plain progress callback for a non-terminal stderr: one line when a file starts,
/// one when it is done; chunk events are ignored.
pub fn print_progress_line(p: &Progress<'_>) {
    let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
    let total = p
        .total_bytes
        .map_or_else(|| "? MiB".to_owned(), |t| format!("{:.1} MiB", mib(t)));
    match p.stage {
        Stage::Checking if p.done_bytes == 0 => eprintln!("{}: checking ({total})", p.file),
        Stage::Started if p.done_bytes > 0 => {
            eprintln!(
                "{}: resuming at {:.1} of {total}",
                p.file,
                mib(p.done_bytes)
            )
        }
        Stage::Started => eprintln!("{}: downloading {total}", p.file),
        Stage::Installed => eprintln!("{}: verified, installed", p.file),
        Stage::AlreadyPresent => eprintln!("{}: already present, verified", p.file),
        Stage::Checking | Stage::Downloading => {}
    }
}

/// What happened to one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileReport {
    /// File name.
    pub name: String,
    /// Final path in the model dir.
    pub path: PathBuf,
    /// Size on disk in bytes.
    pub size_bytes: u64,
    /// SHA-256 of the file (lowercase hex); empty when skipped unverified.
    pub sha256: String,
    /// False only when [`DownloadOptions::allow_unverified`] let an unhashed file through.
    pub is_verified: bool,
    /// Whether it was fetched, and from where.
    pub outcome: Outcome,
}

/// How a file came to be in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Fetched in this run; `resumed_from_bytes` > 0 when a `.part` was continued.
    Downloaded { resumed_from_bytes: u64 },
    /// Already there; nothing fetched.
    AlreadyPresent,
}

/// The result of a successful run, one entry per file, in table order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DownloadReport {
    /// Per-file outcomes.
    pub files: Vec<FileReport>,
}

/// Why a download failed. `Display` is one complete line (the cause included) meant
/// for the user; `source()` gives the underlying error for logs.
#[derive(Debug)]
#[non_exhaustive]
pub enum DownloadError {
    /// No connection to the host (offline, DNS, refused, timed out before a response).
    Unreachable {
        /// File being fetched.
        file: String,
        /// Host that could not be reached.
        host: String,
        /// Where to place files fetched by hand.
        model_dir: PathBuf,
        /// Upstream URLs of every file, to fetch by hand.
        manual_urls: Vec<String>,
        /// What the HTTP client reported.
        source: Box<ureq::Transport>,
    },
    /// The base URL (or a redirect) is not a URL we can fetch.
    BadUrl {
        /// The URL.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The server answered with an error status (404, 403, 5xx...).
    HttpStatus {
        /// File being fetched.
        file: String,
        /// URL that answered.
        url: String,
        /// HTTP status.
        status: u16,
    },
    /// The transfer stopped midway; `FILE.part` keeps what arrived, and a rerun resumes.
    Interrupted {
        /// File being fetched.
        file: String,
        /// Bytes of the file on disk when it stopped.
        done_bytes: u64,
        /// Read error, or an early end of the body.
        source: io::Error,
    },
    /// The content's hash is not the expected one; the part file was deleted.
    HashMismatch {
        /// File name.
        file: String,
        /// Pinned or server-sent SHA-256.
        expected: String,
        /// SHA-256 of what arrived.
        actual: String,
    },
    /// No SHA-256 is known for the file and `allow_unverified` is off.
    Unverifiable {
        /// File name.
        file: String,
        /// URL that sent no usable `X-Linked-Etag`.
        url: String,
    },
    /// Reading or writing the model dir failed.
    Io {
        /// Path involved.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

impl fmt::Display for DownloadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unreachable {
                file,
                host,
                model_dir,
                manual_urls,
                source,
            } => {
                let cause = describe_transport(source);
                write!(f, "cannot reach {host} to fetch {file} ({cause}")?;
                write!(
                    f,
                    "). The real GigaAM v3 weights come from Hugging Face ({UPSTREAM_REPO}); \
                     on a machine that can reach it, fetch {} and place them in {}",
                    manual_urls.join(" "),
                    model_dir.display()
                )
            }
            Self::BadUrl { url, reason } => write!(f, "cannot fetch {url}: {reason}"),
            Self::HttpStatus {
                file,
                url,
                status: 404,
            } => write!(
                f,
                "{file} was not found at {url} (HTTP 404); check the base URL and the variant"
            ),
            Self::HttpStatus {
                file,
                url,
                status: status @ (401 | 403),
            } => write!(
                f,
                "access to {file} was refused at {url} (HTTP {status}); the repository may have \
                 moved or become gated: see https://huggingface.co/{UPSTREAM_REPO}"
            ),
            Self::HttpStatus { file, url, status } => {
                write!(f, "fetching {file} from {url} failed with HTTP {status}")
            }
            Self::Interrupted {
                file,
                done_bytes,
                source,
            } => write!(
                f,
                "download of {file} stopped after {done_bytes} bytes ({source}); \
                 run it again to resume from {file}{PART_SUFFIX}"
            ),
            Self::HashMismatch {
                file,
                expected,
                actual,
            } => write!(
                f,
                "SHA-256 mismatch for {file}: expected {expected}, got {actual}; \
                 the download was deleted"
            ),
            Self::Unverifiable { file, url } => write!(
                f,
                "no SHA-256 known for {file}: gigastt pins none and {url} sent no \
                 X-Linked-Etag; refusing to install an unverified file (allow_unverified, \
                 --allow-unverified, accepts it)"
            ),
            Self::Io { path, source } => write!(f, "{}: {source}", path.display()),
        }
    }
}

impl std::error::Error for DownloadError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Unreachable { source, .. } => Some(source.as_ref()),
            Self::Interrupted { source, .. } | Self::Io { source, .. } => Some(source),
            Self::BadUrl { .. }
            | Self::HttpStatus { .. }
            | Self::HashMismatch { .. }
            | Self::Unverifiable { .. } => None,
        }
    }
}

/// Fetch every file of `opts.variant` into `opts.model_dir`.
pub fn download(
    opts: &DownloadOptions,
    progress: &mut dyn FnMut(&Progress<'_>),
) -> Result<DownloadReport, DownloadError> {
    download_files(opts, files(opts.variant), progress)
}

/// Fetch `files` (the table is a parameter so tests can serve their own) into
/// `opts.model_dir`, in order, stopping at the first failure.
pub fn download_files(
    opts: &DownloadOptions,
    files: &[RemoteFile<'_>],
    progress: &mut dyn FnMut(&Progress<'_>),
) -> Result<DownloadReport, DownloadError> {
    fs::create_dir_all(&opts.model_dir).map_err(io_error(&opts.model_dir))?;
    let fetch = Fetcher {
        agent: ureq::AgentBuilder::new()
            .timeout_connect(CONNECT_TIMEOUT)
            .timeout_read(READ_TIMEOUT)
            .timeout_write(READ_TIMEOUT)
            // Followed by hand: Hugging Face's first hop carries X-Linked-Etag.
            .redirects(0)
            .user_agent(concat!("gigastt/", env!("CARGO_PKG_VERSION")))
            .build(),
        opts,
        files,
    };
    let mut report = DownloadReport::default();
    for file in files {
        report.files.push(fetch.file(file, progress)?);
    }
    Ok(report)
}

/// Shared state of one run.
struct Fetcher<'a> {
    agent: ureq::Agent,
    opts: &'a DownloadOptions,
    files: &'a [RemoteFile<'a>],
}

/// A response past all redirects, with the first SHA-256 any hop announced.
struct Opened {
    response: ureq::Response,
    linked_sha256: Option<String>,
}

impl Fetcher<'_> {
    fn url(&self, name: &str) -> String {
        format!("{}/{name}", self.opts.base_url.trim_end_matches('/'))
    }

    /// Keep a present, matching file; else (re)download it.
    fn file(
        &self,
        file: &RemoteFile<'_>,
        progress: &mut dyn FnMut(&Progress<'_>),
    ) -> Result<FileReport, DownloadError> {
        let path = self.opts.model_dir.join(file.name);
        if path.is_file() {
            if let Some(report) = self.check_present(file, &path, progress)? {
                return Ok(report);
            }
            log::info!("{}: present but stale, fetching again", file.name);
        }
        self.fetch(file, &path, progress)
    }

    /// `Some` when the file on disk is the right one.
    fn check_present(
        &self,
        file: &RemoteFile<'_>,
        path: &Path,
        progress: &mut dyn FnMut(&Progress<'_>),
    ) -> Result<Option<FileReport>, DownloadError> {
        let size_bytes = fs::metadata(path).map_err(io_error(path))?.len();
        if file.size_bytes.is_some_and(|pinned| pinned != size_bytes) {
            return Ok(None);
        }
        let expected = match file.sha256 {
            Some(pinned) => Some(pinned.to_ascii_lowercase()),
            // Headers only: stops at the first hop that names the hash.
            None => self.open(file.name, 0, true)?.linked_sha256,
        };
        let report = |sha256: String, is_verified| FileReport {
            name: file.name.to_owned(),
            path: path.to_owned(),
            size_bytes,
            sha256,
            is_verified,
            outcome: Outcome::AlreadyPresent,
        };
        let (sha256, is_verified) = match expected {
            Some(expected) => {
                let mut hasher = Sha256::new();
                hash_file(path, &mut hasher, file.name, progress)?;
                let actual = to_hex(&hasher.finalize());
                if actual != expected {
                    return Ok(None);
                }
                (actual, true)
            }
            None if self.opts.allow_unverified => (String::new(), false),
            None => {
                return Err(DownloadError::Unverifiable {
                    file: file.name.to_owned(),
                    url: self.url(file.name),
                });
            }
        };
        emit(
            progress,
            file.name,
            Stage::AlreadyPresent,
            size_bytes,
            Some(size_bytes),
        );
        Ok(Some(report(sha256, is_verified)))
    }

    /// Stream into `FILE.part` (resuming it when possible), verify, rename.
    fn fetch(
        &self,
        file: &RemoteFile<'_>,
        path: &Path,
        progress: &mut dyn FnMut(&Progress<'_>),
    ) -> Result<FileReport, DownloadError> {
        let part = part_path(path);
        let mut resumed_from = match fs::metadata(&part) {
            Ok(meta) => meta.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(e) => return Err(io_error(&part)(e)),
        };
        if file.size_bytes.is_some_and(|pinned| resumed_from > pinned) {
            remove_if_present(&part)?;
            resumed_from = 0;
        }
        let mut hasher = Sha256::new();
        if resumed_from > 0 {
            hash_file(&part, &mut hasher, file.name, progress)?;
        }
        let pinned = file.sha256.map(str::to_ascii_lowercase);
        let is_complete_part = resumed_from > 0 && file.size_bytes == Some(resumed_from);
        let (expected, done_bytes) = if is_complete_part && pinned.is_some() {
            // A complete part left by a run that stopped before renaming: no request.
            (pinned, resumed_from)
        } else {
            let (opened, from) = self.open_resumable(file.name, &part, &mut resumed_from)?;
            if from == 0 {
                hasher = Sha256::new();
            }
            let expected = pinned.or(opened.linked_sha256);
            if expected.is_none() && !self.opts.allow_unverified {
                return Err(DownloadError::Unverifiable {
                    file: file.name.to_owned(),
                    url: self.url(file.name),
                });
            }
            let total = total_bytes(&opened.response, from).or(file.size_bytes);
            emit(progress, file.name, Stage::Started, from, total);
            let done = stream_body(
                opened.response,
                &part,
                from,
                total,
                &mut hasher,
                file.name,
                progress,
            )?;
            (expected, done)
        };
        let actual = to_hex(&hasher.finalize());
        if let Some(expected) = &expected
            && *expected != actual
        {
            remove_if_present(&part)?;
            return Err(DownloadError::HashMismatch {
                file: file.name.to_owned(),
                expected: expected.clone(),
                actual,
            });
        }
        fs::rename(&part, path).map_err(io_error(path))?;
        emit(
            progress,
            file.name,
            Stage::Installed,
            done_bytes,
            Some(done_bytes),
        );
        Ok(FileReport {
            name: file.name.to_owned(),
            path: path.to_owned(),
            size_bytes: done_bytes,
            sha256: actual,
            is_verified: expected.is_some(),
            outcome: Outcome::Downloaded {
                resumed_from_bytes: resumed_from,
            },
        })
    }

    /// Open the file at `resumed_from`, falling back to a fresh start (and deleting
    /// the part) when the server can't or won't continue it. Returns where the body
    /// starts; `resumed_from` is zeroed when the part was given up.
    fn open_resumable(
        &self,
        name: &str,
        part: &Path,
        resumed_from: &mut u64,
    ) -> Result<(Opened, u64), DownloadError> {
        loop {
            let offset = *resumed_from;
            let opened = match self.open(name, offset, false) {
                // Range not satisfiable: the part is no prefix of the file.
                Err(DownloadError::HttpStatus { status: 416, .. }) if offset > 0 => None,
                Err(e) => return Err(e),
                Ok(opened) => Some(opened),
            };
            match opened {
                Some(opened) if opened.response.status() == 200 => {
                    // A full body: the part is overwritten from byte 0.
                    *resumed_from = 0;
                    return Ok((opened, 0));
                }
                Some(opened)
                    if opened.response.status() == 206
                        && content_range_start(&opened.response) == Some(offset) =>
                {
                    return Ok((opened, offset));
                }
                Some(opened) if offset == 0 => {
                    return Err(DownloadError::HttpStatus {
                        file: name.to_owned(),
                        url: self.url(name),
                        status: opened.response.status(),
                    });
                }
                _ => {
                    remove_if_present(part)?;
                    *resumed_from = 0;
                }
            }
        }
    }

    /// GET `name` from `offset`, following redirects by hand. With `is_probe`, stop at
    /// the first hop that names the hash: only the headers are wanted.
    fn open(&self, name: &str, offset: u64, is_probe: bool) -> Result<Opened, DownloadError> {
        let mut url = self.url(name);
        let mut linked_sha256 = None;
        for _ in 0..=MAX_REDIRECTS {
            // identity: a compressed body can't be resumed by byte offset.
            let mut request = self.agent.get(&url).set("Accept-Encoding", "identity");
            if offset > 0 {
                request = request.set("Range", &format!("bytes={offset}-"));
            }
            let response = match request.call() {
                Ok(response) => response,
                Err(ureq::Error::Status(status, _)) => {
                    return Err(DownloadError::HttpStatus {
                        file: name.to_owned(),
                        url,
                        status,
                    });
                }
                Err(ureq::Error::Transport(t)) => return Err(self.transport_error(name, &url, t)),
            };
            if linked_sha256.is_none() {
                linked_sha256 = response.header("x-linked-etag").and_then(parse_sha256_etag);
            }
            if !(300..400).contains(&response.status()) || (is_probe && linked_sha256.is_some()) {
                return Ok(Opened {
                    response,
                    linked_sha256,
                });
            }
            let Some(location) = response.header("location") else {
                return Err(DownloadError::HttpStatus {
                    file: name.to_owned(),
                    url,
                    status: response.status(),
                });
            };
            url = join_location(&url, location).ok_or_else(|| DownloadError::BadUrl {
                url: location.to_owned(),
                reason: format!("unusable redirect from {url}"),
            })?;
        }
        Err(DownloadError::BadUrl {
            url,
            reason: format!("more than {MAX_REDIRECTS} redirects"),
        })
    }

    fn transport_error(&self, name: &str, url: &str, t: ureq::Transport) -> DownloadError {
        match t.kind() {
            ureq::ErrorKind::InvalidUrl | ureq::ErrorKind::UnknownScheme => DownloadError::BadUrl {
                url: url.to_owned(),
                reason: describe_transport(&t),
            },
            _ => DownloadError::Unreachable {
                file: name.to_owned(),
                host: host_of(url).to_owned(),
                model_dir: self.opts.model_dir.clone(),
                manual_urls: self
                    .files
                    .iter()
                    .map(|f| format!("{DEFAULT_BASE_URL}/{}", f.name))
                    .collect(),
                source: Box::new(t),
            },
        }
    }
}

/// Append the body to `part` (truncating it first when `from` is 0), hashing as it
/// goes. Returns the file's size.
fn stream_body(
    response: ureq::Response,
    part: &Path,
    from: u64,
    total: Option<u64>,
    hasher: &mut Sha256,
    name: &str,
    progress: &mut dyn FnMut(&Progress<'_>),
) -> Result<u64, DownloadError> {
    let out = if from == 0 {
        File::create(part)
    } else {
        OpenOptions::new().append(true).open(part)
    }
    .map_err(io_error(part))?;
    let mut out = BufWriter::with_capacity(CHUNK_BYTES, out);
    let mut body = response.into_reader();
    let mut buf = vec![0u8; CHUNK_BYTES];
    let mut done = from;
    let interrupted = |done_bytes, source| DownloadError::Interrupted {
        file: name.to_owned(),
        done_bytes,
        source,
    };
    loop {
        let n = match body.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // Keep what arrived: the next run resumes from it.
                out.flush().map_err(io_error(part))?;
                return Err(interrupted(done, e));
            }
        };
        out.write_all(&buf[..n]).map_err(io_error(part))?;
        hasher.update(&buf[..n]);
        done += n as u64;
        emit(progress, name, Stage::Downloading, done, total);
    }
    let out = out
        .into_inner()
        .map_err(|e| io_error(part)(e.into_error()))?;
    out.sync_all().map_err(io_error(part))?;
    match total {
        Some(total) if done < total => {
            let e = io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed early");
            Err(interrupted(done, e))
        }
        _ => Ok(done),
    }
}

/// Feed the file at `path` to `hasher`, reporting `Checking` progress.
fn hash_file(
    path: &Path,
    hasher: &mut Sha256,
    name: &str,
    progress: &mut dyn FnMut(&Progress<'_>),
) -> Result<u64, DownloadError> {
    let mut input = File::open(path).map_err(io_error(path))?;
    let total = input.metadata().map_err(io_error(path))?.len();
    let mut buf = vec![0u8; CHUNK_BYTES];
    let mut done = 0u64;
    emit(progress, name, Stage::Checking, 0, Some(total));
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => return Ok(done),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_error(path)(e)),
        };
        hasher.update(&buf[..n]);
        done += n as u64;
        emit(progress, name, Stage::Checking, done, Some(total));
    }
}

fn emit(
    progress: &mut dyn FnMut(&Progress<'_>),
    file: &str,
    stage: Stage,
    done_bytes: u64,
    total_bytes: Option<u64>,
) {
    progress(&Progress {
        file,
        stage,
        done_bytes,
        total_bytes,
    });
}

fn io_error(path: &Path) -> impl Fn(io::Error) -> DownloadError + '_ {
    move |source| DownloadError::Io {
        path: path.to_owned(),
        source,
    }
}

fn remove_if_present(path: &Path) -> Result<(), DownloadError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_error(path)(e)),
        _ => Ok(()),
    }
}

/// `FILE` → `FILE.part`, next to it (same filesystem, so the rename is atomic).
fn part_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(PART_SUFFIX);
    PathBuf::from(name)
}

/// Size of the whole file from a 200's Content-Length or a 206's Content-Range.
fn total_bytes(response: &ureq::Response, from: u64) -> Option<u64> {
    if response.status() == 206 {
        let range = response.header("content-range")?;
        return range.rsplit_once('/')?.1.trim().parse().ok();
    }
    let length: u64 = response.header("content-length")?.trim().parse().ok()?;
    Some(from + length)
}

/// First byte of a 206 body, from `Content-Range: bytes N-M/T`.
fn content_range_start(response: &ureq::Response) -> Option<u64> {
    parse_range_start(response.header("content-range")?)
}

fn parse_range_start(value: &str) -> Option<u64> {
    let rest = value.trim().strip_prefix("bytes")?.trim_start();
    rest.split_once('-')?.0.trim().parse().ok()
}

/// The SHA-256 in Hugging Face's `X-Linked-Etag` (`"<64 hex>"` for LFS files), if it
/// is one; anything else (a git blob id, a weak tag) is no content hash.
pub fn parse_sha256_etag(value: &str) -> Option<String> {
    let tag = value.trim();
    let tag = tag
        .strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .unwrap_or(tag);
    (tag.len() == 64 && tag.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| tag.to_ascii_lowercase())
}

/// Resolve a `Location` against the URL that sent it. `None` for a downgrade from
/// https to http or a form we don't handle.
fn join_location(base: &str, location: &str) -> Option<String> {
    let (scheme, rest) = base.split_once("://")?;
    let joined = if location.contains("://") {
        location.to_owned()
    } else if let Some(path) = location.strip_prefix("//") {
        format!("{scheme}://{path}")
    } else if location.starts_with('/') {
        format!("{scheme}://{}{location}", host_of(base))
    } else {
        let dir_end = rest
            .rfind('/')
            .map_or(base.len(), |i| scheme.len() + 3 + i + 1);
        let dir = &base[..dir_end];
        if dir.ends_with('/') {
            format!("{dir}{location}")
        } else {
            format!("{dir}/{location}")
        }
    };
    let is_downgrade = scheme.eq_ignore_ascii_case("https") && !joined.starts_with("https://");
    (!is_downgrade).then_some(joined)
}

/// The authority of `url` (`host[:port]`).
fn host_of(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    rest.split(['/', '?', '#']).next().unwrap_or(rest)
}

/// What went wrong in the client, without the URL it prefixes (we name that ourselves).
fn describe_transport(t: &ureq::Transport) -> String {
    let mut text = t.kind().to_string();
    if let Some(message) = t.message() {
        text = format!("{text}: {message}");
    }
    if let Some(cause) = std::error::Error::source(t) {
        text = format!("{text}: {cause}");
    }
    text
}

fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variants_parse_from_their_names() {
        for v in ModelVariant::ALL {
            assert_eq!(v.as_str().parse::<ModelVariant>(), Ok(v));
        }
        assert_eq!(
            "RNNT-INT8".parse::<ModelVariant>(),
            Ok(ModelVariant::RnntInt8)
        );
        let err = "fp16".parse::<ModelVariant>().unwrap_err();
        assert!(err.to_string().contains("rnnt-int8"), "{err}");
    }

    #[test]
    fn default_rnnt_is_fully_pinned() {
        let table = files(ModelVariant::default());
        assert_eq!(table.len(), 4);
        for f in table {
            let hash = f.sha256.unwrap();
            assert_eq!(parse_sha256_etag(hash).as_deref(), Some(hash), "{}", f.name);
            assert!(f.size_bytes.is_some(), "{}", f.name);
        }
        assert_eq!(table[0].size_bytes, Some(885_084_534));
    }

    #[test]
    fn int8_and_ctc_tables_name_the_engine_files() {
        let names = |v| files(v).iter().map(|f| f.name).collect::<Vec<_>>();
        assert_eq!(
            names(ModelVariant::RnntInt8)[0],
            "v3_e2e_rnnt_encoder_int8.onnx"
        );
        assert_eq!(
            names(ModelVariant::Ctc),
            ["v3_e2e_ctc.onnx", "v3_e2e_ctc_vocab.txt"]
        );
        assert_eq!(
            names(ModelVariant::CtcInt8),
            ["v3_e2e_ctc_int8.onnx", "v3_e2e_ctc_vocab.txt"]
        );
    }

    #[test]
    fn etag_is_a_hash_only_when_it_is_64_hex() {
        let hash = "CD60B3764A832E8560AE6D3AD0B10ADC1A42FFAE412B9476F25620AAE4F4A508";
        let lower = hash.to_ascii_lowercase();
        assert_eq!(
            parse_sha256_etag(&format!("\"{hash}\"")),
            Some(lower.clone())
        );
        assert_eq!(parse_sha256_etag(&lower), Some(lower));
        assert_eq!(parse_sha256_etag("\"0123abcd\""), None);
        assert_eq!(parse_sha256_etag(&format!("W/\"{hash}\"")), None);
    }

    #[test]
    fn locations_resolve_like_a_browser() {
        let base = "https://huggingface.co/r/resolve/main/f.onnx";
        let cdn = "https://cdn.example/x?sig=1";
        assert_eq!(join_location(base, cdn).as_deref(), Some(cdn));
        assert_eq!(
            join_location(base, "/api/f").as_deref(),
            Some("https://huggingface.co/api/f")
        );
        assert_eq!(
            join_location(base, "//cdn.example/y").as_deref(),
            Some("https://cdn.example/y")
        );
        assert_eq!(
            join_location(base, "g.onnx").as_deref(),
            Some("https://huggingface.co/r/resolve/main/g.onnx")
        );
        assert_eq!(
            join_location(base, "http://cdn.example/x"),
            None,
            "downgrade"
        );
        assert_eq!(host_of("http://127.0.0.1:9/a/b"), "127.0.0.1:9");
        assert_eq!(host_of("https://huggingface.co"), "huggingface.co");
    }

    #[test]
    fn content_range_start_parses() {
        assert_eq!(parse_range_start("bytes 100-199/200"), Some(100));
        assert_eq!(parse_range_start("bytes */200"), None);
    }

    #[test]
    fn part_file_sits_next_to_the_file() {
        assert_eq!(
            part_path(Path::new("m/a.onnx")),
            PathBuf::from("m/a.onnx.part")
        );
        assert_eq!(to_hex(&[0x00, 0xab, 0xff]), "00abff");
    }
}
