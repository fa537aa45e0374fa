//! Certificates that rotate by themselves, and expiry made visible.
//!
//! [`spawn`] runs next to the server (see `Server::serve`): with
//! `tls.watch_files` it watches the *directories* holding the files `[tls]`
//! names (server certificate and key, client CA bundle, CRLs) with inotify,
//! so that a file renamed into place and a Kubernetes Secret volume's
//! `..data` symlink swap are both seen (a watch on the file itself would
//! follow the old inode and never fire). After `tls.watch_debounce_ms` of
//! quiet it reloads the TLS material through
//! [`ReloadHandle::reload_tls`]: all or nothing, like SIGHUP. A
//! half-written or mismatched pair is refused, logged and counted
//! (`imgsvc_reloads_total{trigger="tls_files",result="error"}`), and the old
//! material keeps serving. New handshakes use the new material; established
//! connections keep theirs.
//!
//! A file change reloads only the TLS material of the configuration in
//! force; it does not re-read the config file. The config file is the
//! operator's, and its changes go live when the operator says so (SIGHUP):
//! a certificate renewal must not also apply a half-edited config.
//!
//! [`LoadedCertificates`] publishes
//! `imgsvc_certificate_expiry_timestamp_seconds{certificate}` for every
//! loaded certificate, and logs a warning for each one that expires within
//! `tls.expiry_warning_days`: at start, at every reload, and once a day.
//!
//! It does not verify anything itself: [`crate::tls::ServerTls::load`] does.

use std::{
    collections::{BTreeSet, HashMap},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, Once},
    time::Duration,
};

use metrics::{counter, describe_counter, describe_gauge, gauge};
use notify::{
    EventKind, RecursiveMode, Watcher,
    event::{AccessKind, AccessMode},
};

use rustls::{
    CertificateError,
    pki_types::{CertificateDer, UnixTime},
    server::danger::ClientCertVerifier,
};

use crate::{
    config::TlsSettings,
    serving::{
        connection::{CloseReason, ConnectionHandle, OpenConnections},
        server::ReloadHandle,
    },
    tls::{CertificateValidity, ServerTls},
};

pub const CERTIFICATE_EXPIRY_TIMESTAMP_SECONDS: &str = "imgsvc_certificate_expiry_timestamp_seconds";
pub const RELOADS_TOTAL: &str = "imgsvc_reloads_total";

/// How often expiry warnings are repeated while they hold.
const WARN_EVERY: Duration = Duration::from_secs(24 * 3600);

fn describe() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        describe_gauge!(
            CERTIFICATE_EXPIRY_TIMESTAMP_SECONDS,
            metrics::Unit::Seconds,
            "When each loaded certificate expires (notAfter, Unix time): server, server_chain:<subject>, client_ca:<subject>, crl:<issuer> (nextUpdate); NaN once no longer loaded"
        );
        describe_counter!(RELOADS_TOTAL, "Reloads by trigger (signal: SIGHUP; tls_files: a watched TLS file changed) and result (ok, error)");
    });
}

/// What started a reload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// SIGHUP: the whole configuration.
    Signal,
    /// A watched TLS file changed: the TLS material only.
    TlsFiles,
}

/// Counts one reload attempt in `imgsvc_reloads_total`.
pub fn count_reload(trigger: Trigger, ok: bool) {
    describe();
    let trigger = match trigger {
        Trigger::Signal => "signal",
        Trigger::TlsFiles => "tls_files",
    };
    counter!(RELOADS_TOTAL, "trigger" => trigger, "result" => if ok { "ok" } else { "error" }).increment(1);
}

/// The certificates a server has loaded: the expiry gauge, the expiry
/// warnings, whether new material differs from what is loaded, and the
/// client certificate verifier in force (open connections are checked
/// again with it after each reload).
#[derive(Clone)]
pub struct LoadedCertificates {
    inner: Arc<Mutex<Loaded>>,
    /// Counts publications: changes after every load (start, reload).
    published: Arc<tokio::sync::watch::Sender<u64>>,
}

impl Default for LoadedCertificates {
    fn default() -> Self {
        Self { inner: Arc::default(), published: Arc::new(tokio::sync::watch::channel(0).0) }
    }
}

#[derive(Default)]
struct Loaded {
    verifier: Option<Arc<dyn ClientCertVerifier>>,
    fingerprint: Option<u64>,
    validity: Vec<CertificateValidity>,
    /// Gauge labels published so far (to blank those no longer loaded).
    labels: BTreeSet<String>,
}

impl LoadedCertificates {
    fn lock(&self) -> std::sync::MutexGuard<'_, Loaded> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `tls` holds other certificates or CRLs than those loaded.
    pub fn differs(&self, tls: &ServerTls) -> bool {
        self.lock().fingerprint != Some(tls.fingerprint)
    }

    /// Records `tls` as the loaded material: sets the expiry gauge (NaN for
    /// certificates no longer loaded, so that alerts on it stop) and warns
    /// about certificates that expire within `warning_days`.
    pub fn publish(&self, tls: &ServerTls, warning_days: u32) {
        describe();
        let mut loaded = self.lock();
        // Two CAs of one subject (not something gen-certs makes) share a
        // series: it shows the earlier expiry, the one that bites first.
        let mut earliest = std::collections::BTreeMap::<&str, i64>::new();
        for v in &tls.validity {
            let t = earliest.entry(v.certificate.as_str()).or_insert(v.not_after);
            *t = (*t).min(v.not_after);
        }
        for (label, not_after) in &earliest {
            gauge!(CERTIFICATE_EXPIRY_TIMESTAMP_SECONDS, "certificate" => label.to_string()).set(*not_after as f64);
        }
        for gone in loaded.labels.iter().filter(|l| !earliest.contains_key(l.as_str())) {
            gauge!(CERTIFICATE_EXPIRY_TIMESTAMP_SECONDS, "certificate" => gone.clone()).set(f64::NAN);
        }
        loaded.labels.extend(earliest.keys().map(|l| l.to_string()));
        loaded.fingerprint = Some(tls.fingerprint);
        loaded.validity = tls.validity.clone();
        loaded.verifier = Some(tls.verifier.clone());
        drop(loaded);
        self.published.send_modify(|n| *n += 1);
        self.warn(warning_days);
    }

    /// The client certificate verifier of the material loaded last.
    pub fn verifier(&self) -> Option<Arc<dyn ClientCertVerifier>> {
        self.lock().verifier.clone()
    }

    /// Changes after every [`LoadedCertificates::publish`]: once the
    /// verifier of a reload is in place.
    pub fn publications(&self) -> tokio::sync::watch::Receiver<u64> {
        self.published.subscribe()
    }

    /// Logs a warning for each loaded certificate that expires within
    /// `warning_days` (or has expired).
    pub fn warn(&self, warning_days: u32) {
        for w in expiring(&self.lock().validity, unix_now(), warning_days) {
            tracing::warn!(certificate = %w.certificate, not_after = %w.not_after_text(), days_left = w.days_left(), "{w}");
        }
    }
}

/// A certificate that expires within the warning window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpiryWarning {
    pub certificate: String,
    pub not_after: i64,
    /// Seconds from now to notAfter; negative once expired.
    pub seconds_left: i64,
}

impl ExpiryWarning {
    /// Whole days left, rounded down (negative: days since it expired).
    pub fn days_left(&self) -> i64 {
        self.seconds_left.div_euclid(86_400)
    }

    /// notAfter as `YYYY-MM-DD HH:MM:SS UTC`.
    pub fn not_after_text(&self) -> String {
        crate::tls::utc_text(self.not_after)
    }
}

impl std::fmt::Display for ExpiryWarning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (certificate, at) = (&self.certificate, self.not_after_text());
        if let Some(issuer) = certificate.strip_prefix("crl:") {
            return if self.seconds_left < 0 {
                write!(f, "the CRL of {issuer} has expired ({at}, its nextUpdate): every client of that CA is refused; sign a fresh one")
            } else {
                write!(f, "the CRL of {issuer} expires {at} (its nextUpdate), in {} days: sign a fresh one", self.days_left())
            };
        }
        if self.seconds_left < 0 {
            write!(f, "certificate {certificate} has expired: its validity ended {at}")
        } else {
            write!(f, "certificate {certificate} expires {at}, in {} days: renew it", self.days_left())
        }
    }
}

/// The certificates of `validity` that expire within `warning_days` of
/// `now` (seconds since the epoch), soonest first; none when `warning_days`
/// is 0.
pub fn expiring(validity: &[CertificateValidity], now: i64, warning_days: u32) -> Vec<ExpiryWarning> {
    if warning_days == 0 {
        return Vec::new();
    }
    let window = i64::from(warning_days) * 86_400;
    let mut out: Vec<ExpiryWarning> = validity
        .iter()
        .filter(|v| v.not_after - now <= window)
        .map(|v| ExpiryWarning { certificate: v.certificate.clone(), not_after: v.not_after, seconds_left: v.not_after - now })
        .collect();
    out.sort_by_key(|w| w.not_after);
    out
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// Stops the watcher when dropped.
pub struct WatchGuard(tokio::task::JoinHandle<()>);

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Starts watching the TLS files of the configuration in force (when
/// `tls.watch_files` says so; a SIGHUP that changes the key or the paths is
/// followed) and repeating expiry warnings daily. Runs until the guard is
/// dropped.
pub fn spawn(reload: ReloadHandle) -> WatchGuard {
    // The watch is in place when this returns: a change made once the
    // server serves is seen. One look right away catches a change made
    // between the load at start and now.
    let changed = Arc::new(tokio::sync::Notify::new());
    let mut watch = None;
    sync_watch(&mut watch, &reload.tls_settings(), &changed);
    changed.notify_one();
    WatchGuard(tokio::spawn(run(reload, changed, watch)))
}

async fn run(reload: ReloadHandle, changed: Arc<tokio::sync::Notify>, mut watch: Option<DirWatch>) {
    let mut reloaded = reload.tls_changes();
    let mut published = reload.certificates().publications();
    let mut daily = tokio::time::interval_at(tokio::time::Instant::now() + WARN_EVERY, WARN_EVERY);
    let mut expiry = tokio::time::interval(EXPIRY_CHECK_EVERY);
    expiry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut not_after = HashMap::new();
    // A handshake in progress during a reload finishes with the material
    // before it: its connection is checked once more when every such
    // handshake has finished or timed out.
    let mut late_check: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
    loop {
        let settings = reload.tls_settings();
        sync_watch(&mut watch, &settings, &changed);
        tokio::select! {
            () = changed.notified() => {
                settle(&changed, settings.watch_debounce).await;
                match reload.reload_tls() {
                    Ok(true) => {
                        count_reload(Trigger::TlsFiles, true);
                        tracing::info!("TLS files changed: certificates reloaded; new connections use them");
                    }
                    Ok(false) => tracing::debug!("a watched directory changed, but the TLS material did not"),
                    Err(e) => {
                        count_reload(Trigger::TlsFiles, false);
                        tracing::error!(
                            error = %format!("{:#}", anyhow::Error::new(e)),
                            "TLS files changed but cannot be loaded: keeping the previous certificates"
                        );
                    }
                }
            }
            changed = reloaded.changed() => {
                // A reload (ours or SIGHUP's) may have changed the paths:
                // the loop re-syncs the watch.
                if changed.is_err() {
                    return;
                }
            }
            _ = daily.tick() => reload.certificates().warn(settings.expiry_warning_days),
            changed = published.changed() => {
                if changed.is_err() {
                    return;
                }
                recheck_open_connections(&reload, &settings);
                late_check = Some(Box::pin(tokio::time::sleep(settings.handshake_timeout)));
            }
            () = async { late_check.as_mut().expect("guarded").await }, if late_check.is_some() => {
                late_check = None;
                recheck_open_connections(&reload, &settings);
            }
            _ = expiry.tick() => {
                close_expired(&reload.connections(), &mut not_after, unix_now(), settings.revoked_grace);
            }
        }
    }
}

/// How often the expiry of open connections' client certificates is checked.
pub const EXPIRY_CHECK_EVERY: Duration = Duration::from_secs(1);

/// Why a client chain (leaf first) no longer verifies with `verifier` at
/// `now`, if it does not: the same check as at the handshake (roots, CRLs,
/// validity, usage). `None` for a chain that verifies, or an empty one (a
/// connection without a certificate has no tenant: its calls are refused).
pub fn recheck(
    verifier: &dyn ClientCertVerifier,
    certificates: &[CertificateDer<'static>],
    now: UnixTime,
) -> Option<(CloseReason, rustls::Error)> {
    let (leaf, intermediates) = certificates.split_first()?;
    let err = verifier.verify_client_cert(leaf, intermediates, now).err()?;
    let reason = match &err {
        rustls::Error::InvalidCertificate(CertificateError::Expired | CertificateError::ExpiredContext { .. }) => CloseReason::Expired,
        _ => CloseReason::Revoked,
    };
    Some((reason, err))
}

/// Verifies every open connection's client chain again with `verifier`
/// (the one new handshakes use, after a reload) and closes those that fail
/// gracefully: GOAWAY now, `grace` for their calls. A chain shared by
/// several connections is verified once. Returns how many it closed.
pub fn close_unverified(connections: &OpenConnections, verifier: &dyn ClientCertVerifier, grace: Duration) -> usize {
    let now = UnixTime::now();
    let open = connections.list();
    let mut verdicts: HashMap<&[CertificateDer<'static>], Option<(CloseReason, String)>> = HashMap::new();
    let mut closed = 0;
    for conn in open.iter().filter(|c| c.closing().is_none()) {
        let verdict = verdicts
            .entry(conn.certificates.as_slice())
            .or_insert_with(|| recheck(verifier, &conn.certificates, now).map(|(reason, e)| (reason, e.to_string())));
        if let Some((reason, error)) = verdict {
            log_failed(conn, *reason, error);
            conn.close_gracefully(*reason, grace);
            closed += 1;
        }
    }
    closed
}

/// The earliest notAfter of a chain (seconds since the epoch); `None` for
/// an empty or unparsable one.
fn chain_not_after(certificates: &[CertificateDer<'static>]) -> Option<i64> {
    use x509_parser::prelude::FromDer;
    certificates
        .iter()
        .map(|der| x509_parser::certificate::X509Certificate::from_der(der).ok().map(|(_, c)| c.validity().not_after.timestamp()))
        .collect::<Option<Vec<i64>>>()?
        .into_iter()
        .min()
}

/// Closes the open connections whose client chain has passed its
/// notAfter (as a handshake at `now` would refuse it). `not_after` caches
/// each connection's earliest notAfter by id; ids no longer open are
/// dropped from it.
fn close_expired(connections: &OpenConnections, not_after: &mut HashMap<u64, Option<i64>>, now: i64, grace: Duration) -> usize {
    let open = connections.list();
    let ids: std::collections::HashSet<u64> = open.iter().map(|c| c.id).collect();
    not_after.retain(|id, _| ids.contains(id));
    let mut closed = 0;
    for conn in &open {
        let t = *not_after.entry(conn.id).or_insert_with(|| chain_not_after(&conn.certificates));
        // webpki refuses a certificate once now > notAfter.
        if t.is_some_and(|t| now > t) && conn.closing().is_none() {
            let at = crate::tls::utc_text(t.unwrap_or_default());
            log_failed(conn, CloseReason::Expired, &format!("a certificate of its chain expired at {at}"));
            conn.close_gracefully(CloseReason::Expired, grace);
            closed += 1;
        }
    }
    closed
}

fn log_failed(conn: &ConnectionHandle, reason: CloseReason, error: &str) {
    let tenant = conn.identity.tenant_label();
    tracing::warn!(
        peer = %conn.peer,
        %tenant,
        reason = reason.label(),
        error,
        "the client certificate of an open connection no longer verifies: closing it"
    );
}

/// After a reload: verifies every open connection's client certificate
/// again with the verifier now in force, and closes those that fail.
fn recheck_open_connections(reload: &ReloadHandle, settings: &TlsSettings) {
    let Some(verifier) = reload.certificates().verifier() else { return };
    let closed = close_unverified(&reload.connections(), verifier.as_ref(), settings.revoked_grace);
    if closed > 0 {
        tracing::warn!(closed, "TLS material reloaded: closing connections whose client certificates no longer verify");
    }
}

/// Waits until no change was seen for `debounce`, at most 10 × `debounce`
/// in all (a directory that never goes quiet still gets its reloads).
async fn settle(changed: &tokio::sync::Notify, debounce: Duration) {
    let give_up = tokio::time::sleep(debounce * 10);
    tokio::pin!(give_up);
    loop {
        tokio::select! {
            () = changed.notified() => {}
            () = tokio::time::sleep(debounce) => return,
            () = &mut give_up => return,
        }
    }
}

/// An inotify watch on a set of directories.
struct DirWatch {
    dirs: BTreeSet<PathBuf>,
    _watcher: notify::RecommendedWatcher,
}

/// The directories to watch for `settings`: each file's directory
/// (renames into place, `..data` swaps) and, for a symlink, the directory
/// of its target; canonical, so that no directory is watched twice.
pub fn watched_dirs(settings: &TlsSettings) -> BTreeSet<PathBuf> {
    let files = [&settings.cert, &settings.key, &settings.client_ca].into_iter().chain(&settings.crl_files);
    let mut dirs = BTreeSet::new();
    for file in files {
        let parent = file.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        dirs.insert(std::fs::canonicalize(parent).unwrap_or_else(|_| parent.to_path_buf()));
        if let Some(target_dir) = std::fs::canonicalize(file).ok().as_deref().and_then(Path::parent) {
            dirs.insert(target_dir.to_path_buf());
        }
    }
    dirs
}

fn sync_watch(watch: &mut Option<DirWatch>, settings: &TlsSettings, changed: &Arc<tokio::sync::Notify>) {
    if !settings.watch_files {
        *watch = None;
        return;
    }
    let dirs = watched_dirs(settings);
    if watch.as_ref().is_some_and(|w| w.dirs == dirs) {
        return;
    }
    *watch = match start_watch(dirs.clone(), changed.clone()) {
        Ok(w) => {
            tracing::debug!(dirs = ?dirs, "watching the TLS files' directories");
            Some(w)
        }
        Err(e) => {
            tracing::warn!(error = %e, dirs = ?dirs, "cannot watch the TLS files: reload them with SIGHUP");
            None
        }
    };
}

fn start_watch(dirs: BTreeSet<PathBuf>, changed: Arc<tokio::sync::Notify>) -> notify::Result<DirWatch> {
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Reads (ours included: loading the files opens them) are not changes.
        let is_change = match event {
            Ok(e) => !matches!(e.kind, EventKind::Access(a) if a != AccessKind::Close(AccessMode::Write)),
            // An overflowed queue lost events: look again.
            Err(_) => true,
        };
        if is_change {
            changed.notify_one();
        }
    })?;
    for dir in &dirs {
        // A directory that vanished (an old `..data` target) is not watched;
        // the next reload re-syncs the set.
        if let Err(e) = watcher.watch(dir, RecursiveMode::NonRecursive) {
            tracing::debug!(dir = %dir.display(), error = %e, "not watching");
        }
    }
    Ok(DirWatch { dirs, _watcher: watcher })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn validity(certificate: &str, not_after: i64) -> CertificateValidity {
        CertificateValidity { certificate: certificate.into(), not_after }
    }

    #[test]
    fn expiring_lists_certificates_within_the_window_soonest_first() {
        let day = 86_400;
        let now = 1_800_000_000;
        let loaded = [
            validity("server", now + 20 * day),
            validity("client_ca:CN=b", now + 14 * day),
            validity("client_ca:CN=a", now + 3 * day + 5),
            validity("server_chain:CN=i", now - day - 1),
        ];
        let warnings = expiring(&loaded, now, 14);
        let seen: Vec<(&str, i64)> = warnings.iter().map(|w| (w.certificate.as_str(), w.days_left())).collect();
        assert_eq!(seen, [("server_chain:CN=i", -2), ("client_ca:CN=a", 3), ("client_ca:CN=b", 14)]);
        assert_eq!(expiring(&loaded, now, 0), []);
    }

    #[test]
    fn warnings_say_when_and_what_to_do() {
        let w = ExpiryWarning { certificate: "server".into(), not_after: 1_800_000_000, seconds_left: 3 * 86_400 + 7 };
        assert_eq!(w.to_string(), "certificate server expires 2027-01-15 08:00:00 UTC, in 3 days: renew it");
        let w = ExpiryWarning { seconds_left: -1, ..w };
        assert_eq!(w.to_string(), "certificate server has expired: its validity ended 2027-01-15 08:00:00 UTC");
        let w = ExpiryWarning { certificate: "crl:CN=ca".into(), seconds_left: 3 * 86_400 + 7, ..w };
        assert_eq!(w.to_string(), "the CRL of CN=ca expires 2027-01-15 08:00:00 UTC (its nextUpdate), in 3 days: sign a fresh one");
        let w = ExpiryWarning { seconds_left: -1, ..w };
        assert_eq!(
            w.to_string(),
            "the CRL of CN=ca has expired (2027-01-15 08:00:00 UTC, its nextUpdate): every client of that CA is refused; sign a fresh one"
        );
    }

    #[test]
    fn watched_dirs_are_the_configured_directories_and_symlink_targets() {
        let dir = tempfile::tempdir().unwrap();
        let (tls, real) = (dir.path().join("tls"), dir.path().join("elsewhere"));
        std::fs::create_dir_all(&tls).unwrap();
        std::fs::create_dir_all(&real).unwrap();
        std::fs::write(real.join("ca.pem"), "x").unwrap();
        std::os::unix::fs::symlink(real.join("ca.pem"), tls.join("ca.pem")).unwrap();
        let settings = TlsSettings {
            cert: tls.join("server.pem"),
            key: tls.join("server-key.pem"),
            client_ca: tls.join("ca.pem"),
            trust_domain: crate::identity::TrustDomain::parse("imgsvc.local").unwrap(),
            dev_auto_certs: false,
            handshake_timeout: Duration::from_secs(10),
            crl_files: vec!["crl.pem".into()],
            watch_files: true,
            watch_debounce: Duration::from_millis(500),
            expiry_warning_days: 14,
            kernel_tls: crate::config::KernelTlsMode::Off,
            refuse_exposed_key: false,
            revoked_grace: Duration::from_secs(10),
            kernel_tls_close_after_records: None,
        };
        let here = std::env::current_dir().unwrap().canonicalize().unwrap();
        let want: BTreeSet<PathBuf> = [here, tls.canonicalize().unwrap(), real.canonicalize().unwrap()].into();
        assert_eq!(watched_dirs(&settings), want);
    }
}
