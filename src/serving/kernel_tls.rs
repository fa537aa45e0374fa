//! Kernel TLS (kTLS): once rustls has finished a connection's handshake,
//! the kernel encrypts and decrypts its records (`tls.kernel_tls`).
//!
//! Why: with rustls doing it, every byte of a request and an answer is
//! copied between the socket and rustls's buffers, and once more between
//! rustls's plaintext and h2's (`docs/performance.md#transport-floor`).
//! With the kernel doing it, `read` returns plaintext and `write` takes
//! plaintext: the cipher runs during the copy that crosses the socket
//! anyway, and rustls's record copies and buffers go.
//!
//! How, for one connection:
//! 1. The handshake runs in rustls's unbuffered API ([`handshake`]), which
//!    is fed exactly the bytes read: the socket ([`LaneTcp`]) returns at
//!    most one TLS record per read ([`LaneTcp::bound_reads_to_records`]), and
//!    the handshake ends at a record boundary, so no byte the kernel needs
//!    is left in user space. Application data that arrived with the
//!    client's Finished is decrypted by rustls and kept.
//! 2. [`offload`] turns the connection into rustls's
//!    [`KernelConnection`] (which keeps the traffic secrets for key
//!    updates), and hands the keys and sequence numbers to the kernel
//!    (`TCP_ULP` `tls`, then `TLS_TX` and `TLS_RX`).
//! 3. [`KernelTlsStream`] serves the drained plaintext first, then reads and
//!    writes the socket. A record that is not application data makes `read`
//!    fail with `EIO`; it is then read with `recvmsg` and its type and
//!    decided as rustls decides it ([`decide`]): close_notify ends the
//!    stream, a client's TLS 1.3 KeyUpdate is followed (the new receiving
//!    key from rustls, then `TLS_RX` again; the server's own KeyUpdate
//!    before its next record when the client asks for one), alerts are
//!    taken as rustls takes them. Shutting down sends close_notify.
//! 4. The server's sending key never passes its limit: near it, a TLS 1.3
//!    connection sends a KeyUpdate and changes keys; a TLS 1.2 one (no key
//!    update in TLS 1.2) closes gracefully ([`KeyLimit`]).
//!
//! Whether the kernel can do it at all is [`probe`]d once at start, on a
//! loopback socket pair: the `tls` upper-layer protocol must exist (the
//! `tls` module, `CONFIG_TLS`), every cipher rustls may negotiate must be
//! taken (a handshake run for the kernel cannot fall back to rustls's
//! record layer), and a second `TLS_TX` tells whether the kernel accepts
//! new keys on a live socket (Linux 6.14 and later). Where it does not, a
//! client's KeyUpdate and the key limit close the connection gracefully
//! instead (GOAWAY; calls in flight finish). `auto` serves through rustls
//! when the kernel cannot; `on` refuses to start.

use std::{
    io,
    os::fd::{AsRawFd, RawFd},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use rustls::{
    ConnectionTrafficSecrets, ProtocolVersion, ServerConfig,
    kernel::KernelConnection,
    server::{ServerConnectionData, UnbufferedServerConnection},
    unbuffered::{ConnectionState, EncodeError, UnbufferedStatus},
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest, ReadBuf};

use crate::{config::KernelTlsMode, serving::lanes::LaneTcp};

/// TLS record content types (RFC 8446 §5.1).
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;
const APPLICATION_DATA: u8 = 23;
/// Handshake message type of a KeyUpdate (RFC 8446 §4).
const KEY_UPDATE: u8 = 24;
const CLOSE_NOTIFY: u8 = 0;

/// The AEAD ciphers the kernel accepted in [`probe`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ciphers {
    pub aes_128_gcm: bool,
    pub aes_256_gcm: bool,
    pub chacha20_poly1305: bool,
}

impl std::fmt::Display for Ciphers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> =
            [(self.aes_128_gcm, "AES-128-GCM"), (self.aes_256_gcm, "AES-256-GCM"), (self.chacha20_poly1305, "ChaCha20-Poly1305")]
                .into_iter()
                .filter_map(|(on, name)| on.then_some(name))
                .collect();
        f.write_str(&names.join(", "))
    }
}

impl Ciphers {
    /// Every cipher rustls may negotiate.
    pub const ALL: Ciphers = Ciphers { aes_128_gcm: true, aes_256_gcm: true, chacha20_poly1305: true };
}

/// What the kernel takes: its ciphers, and whether it accepts new keys on a
/// live socket (TLS 1.3 key updates, Linux 6.14 and later).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelTls {
    pub ciphers: Ciphers,
    pub rekey: bool,
}

impl std::fmt::Display for KernelTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys = if self.rekey {
            "TLS 1.3 key updates followed in the kernel"
        } else {
            "this kernel takes no new keys (before Linux 6.14): a TLS 1.3 key update or the key limit closes the connection gracefully"
        };
        // TLS 1.2 AES-GCM's nonces: see `tls12_gcm_first_kernel_nonce`.
        write!(f, "{}; TLS 1.2 AES-GCM with explicit nonces disjoint from rustls's; {keys}", self.ciphers)
    }
}

/// What [`probe`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Support {
    Available(KernelTls),
    /// Why not, for the log and the `on` refusal.
    Unavailable(String),
}

/// Which cipher a key is for, as the kernel names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cipher {
    Aes128Gcm,
    Aes256Gcm,
    Chacha20Poly1305,
}

impl Ciphers {
    fn has(&self, cipher: Cipher) -> bool {
        match cipher {
            Cipher::Aes128Gcm => self.aes_128_gcm,
            Cipher::Aes256Gcm => self.aes_256_gcm,
            Cipher::Chacha20Poly1305 => self.chacha20_poly1305,
        }
    }
}

/// Whether this kernel offers kernel TLS, and with which ciphers: tried on
/// a connected loopback socket pair per cipher (127.0.0.1, else ::1), with
/// zero keys, never used to send anything. Blocking; run once at start.
pub fn probe() -> Support {
    let listener = match std::net::TcpListener::bind("127.0.0.1:0").or_else(|_| std::net::TcpListener::bind("[::1]:0")) {
        Ok(l) => l,
        Err(e) => return Support::Unavailable(format!("cannot open a loopback socket to probe it: {e}")),
    };
    let (mut ciphers, mut rekey) = (Ciphers::default(), false);
    for cipher in [Cipher::Aes128Gcm, Cipher::Aes256Gcm, Cipher::Chacha20Poly1305] {
        let pair = listener.local_addr().and_then(std::net::TcpStream::connect).and_then(|c| Ok((c, listener.accept()?.0)));
        let (client, _server) = match pair {
            Ok(pair) => pair,
            Err(e) => return Support::Unavailable(format!("cannot connect a loopback socket pair to probe it: {e}")),
        };
        let fd = client.as_raw_fd();
        if let Err(e) = set_ulp(fd) {
            let ulps = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_ulp").unwrap_or_default();
            return Support::Unavailable(format!(
                "the kernel has no `tls` upper-layer protocol (setsockopt TCP_ULP \"tls\": {e}; tcp_available_ulp: {:?}): load the `tls` module (`modprobe tls`) or build the kernel with CONFIG_TLS",
                ulps.trim()
            ));
        }
        let info = CryptoInfo::new(cipher, libc::TLS_1_3_VERSION, &vec![0; cipher.key_len()], &[0; 12], 0);
        let works =
            info.as_ref().is_ok_and(|info| set_crypto(fd, libc::TLS_TX, info).is_ok() && set_crypto(fd, libc::TLS_RX, info).is_ok());
        // On the first socket that took a cipher, a second TLS_TX: a key
        // update (Linux 6.14 and later); older kernels refuse it (EBUSY).
        if works && ciphers == Ciphers::default() {
            rekey = info.as_ref().is_ok_and(|info| set_crypto(fd, libc::TLS_TX, info).is_ok());
        }
        match cipher {
            Cipher::Aes128Gcm => ciphers.aes_128_gcm = works,
            Cipher::Aes256Gcm => ciphers.aes_256_gcm = works,
            Cipher::Chacha20Poly1305 => ciphers.chacha20_poly1305 = works,
        }
    }
    if ciphers == Ciphers::default() {
        return Support::Unavailable("the kernel's `tls` module accepted none of AES-128-GCM, AES-256-GCM, ChaCha20-Poly1305".into());
    }
    Support::Available(KernelTls { ciphers, rekey })
}

/// What `tls.kernel_tls` comes to on this kernel, for the start and for
/// `--check-config` alike: what the kernel takes over (`None`: rustls
/// seals every record) and the summary the start line shows (`on
/// (ciphers; …)`, `off`, or `off: <why>` when `auto` falls back), or why
/// `on` cannot start. A kernel that lacks one of the ciphers rustls may
/// negotiate is not used: a handshake run for the kernel cannot go back to
/// rustls's record layer.
pub fn resolve(mode: KernelTlsMode) -> Result<(Option<KernelTls>, String), String> {
    if mode == KernelTlsMode::Off {
        return Ok((None, "off".into()));
    }
    let support = match probe() {
        Support::Available(kernel) if kernel.ciphers != Ciphers::ALL => Support::Unavailable(format!(
            "the kernel's `tls` module takes only {} of AES-128-GCM, AES-256-GCM, ChaCha20-Poly1305, and a connection \
             that negotiates another could not be served",
            kernel.ciphers
        )),
        support => support,
    };
    match support {
        Support::Available(kernel) => Ok((Some(kernel), format!("on ({kernel})"))),
        Support::Unavailable(why) if mode == KernelTlsMode::On => Err(why),
        Support::Unavailable(why) => Ok((None, format!("off: {why}"))),
    }
}

impl Cipher {
    fn key_len(self) -> usize {
        match self {
            Cipher::Aes128Gcm => 16,
            Cipher::Aes256Gcm | Cipher::Chacha20Poly1305 => 32,
        }
    }

    /// The cipher of extracted secrets. rustls reports TLS 1.2's AES-GCM as
    /// `Aes128Gcm` whatever the key size, so the key length decides.
    fn of(secrets: &ConnectionTrafficSecrets) -> Option<(Cipher, &[u8], &[u8])> {
        match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } | ConnectionTrafficSecrets::Aes256Gcm { key, iv } => {
                let cipher = if key.as_ref().len() == 16 { Cipher::Aes128Gcm } else { Cipher::Aes256Gcm };
                Some((cipher, key.as_ref(), iv.as_ref()))
            }
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => Some((Cipher::Chacha20Poly1305, key.as_ref(), iv.as_ref())),
            _ => None,
        }
    }
}

/// The kernel cipher of every suite rustls may negotiate (ring's provider,
/// as in `src/tls.rs`).
fn kernel_cipher(suite: rustls::CipherSuite) -> Option<Cipher> {
    use rustls::CipherSuite as S;
    Some(match suite {
        S::TLS13_AES_128_GCM_SHA256 | S::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 | S::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => {
            Cipher::Aes128Gcm
        }
        S::TLS13_AES_256_GCM_SHA384 | S::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384 | S::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => {
            Cipher::Aes256Gcm
        }
        S::TLS13_CHACHA20_POLY1305_SHA256
        | S::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
        | S::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256 => Cipher::Chacha20Poly1305,
        _ => return None,
    })
}

/// TLS 1.2 AES-GCM: the first explicit nonce the kernel may send, given
/// rustls's `e` (the last eight bytes of its IV) and the records rustls
/// sealed under the key before the switch (`used`, its sequence number:
/// the server's Finished, so 1).
///
/// rustls sends `e XOR seq` as each record's explicit nonce; the kernel
/// sends the IV it is handed and adds one per record
/// (`tls_advance_record_sn`). Handed `e`, its first record would repeat
/// the Finished's nonce under the same key (a GCM nonce reuse, which leaks
/// the authentication key). The peer reads the explicit nonce from each
/// record, so any unique sequence is valid: every `e XOR s` with
/// `s < used` lies in the aligned block of `2^k >= used` values around
/// `e`, and the kernel starts just past that block. It sends at most the
/// suite's confidentiality limit (2^24) records under the key
/// ([`KernelTlsStream::writable`]), far from wrapping around 2^64 back into
/// the block; `tls12_gcm_kernel_nonces_are_disjoint_from_rustls_s` checks
/// the whole sequence.
fn tls12_gcm_first_kernel_nonce(e: u64, used: u64) -> u64 {
    let bits = u64::BITS - used.saturating_sub(1).leading_zeros();
    let block = if bits >= u64::BITS { u64::MAX } else { (1u64 << bits) - 1 };
    (e | block).wrapping_add(1)
}

/// One direction's key material in the layout of `linux/tls.h`, made only
/// on the heap ([`CryptoInfo::new`] returns it boxed and fills it in place,
/// so the key, salt and IV are never moved by value) and wiped with
/// `zeroize` when dropped.
enum CryptoInfo {
    Aes128Gcm(libc::tls12_crypto_info_aes_gcm_128),
    Aes256Gcm(libc::tls12_crypto_info_aes_gcm_256),
    Chacha20Poly1305(libc::tls12_crypto_info_chacha20_poly1305),
}

impl CryptoInfo {
    /// `iv` is rustls's 12-byte IV: for AES-GCM the kernel wants its first
    /// four bytes as the salt and the other eight as the IV; ChaCha20 takes
    /// all twelve. `seq` is the next record's sequence number.
    fn new(cipher: Cipher, version: u16, key: &[u8], iv: &[u8], seq: u64) -> Result<Box<Self>, String> {
        let mut info = Box::new(Self::empty(cipher, version));
        info.fill(key, iv, seq)?;
        Ok(info)
    }

    /// For the sending side: as [`CryptoInfo::new`], but a TLS 1.2 AES-GCM
    /// key starts the kernel's explicit nonces past every one rustls sent
    /// ([`tls12_gcm_first_kernel_nonce`]).
    fn for_sending(cipher: Cipher, version: u16, key: &[u8], iv: &[u8], seq: u64) -> Result<Box<Self>, String> {
        let mut info = Self::new(cipher, version, key, iv, seq)?;
        if version == libc::TLS_1_2_VERSION
            && let CryptoInfo::Aes128Gcm(libc::tls12_crypto_info_aes_gcm_128 { iv, .. })
            | CryptoInfo::Aes256Gcm(libc::tls12_crypto_info_aes_gcm_256 { iv, .. }) = &mut *info
        {
            *iv = tls12_gcm_first_kernel_nonce(u64::from_be_bytes(*iv), seq).to_be_bytes();
        }
        Ok(info)
    }

    /// The header alone; every secret byte zero.
    fn empty(cipher: Cipher, version: u16) -> Self {
        let info = |cipher_type| libc::tls_crypto_info { version, cipher_type };
        match cipher {
            Cipher::Aes128Gcm => CryptoInfo::Aes128Gcm(libc::tls12_crypto_info_aes_gcm_128 {
                info: info(libc::TLS_CIPHER_AES_GCM_128),
                iv: [0; 8],
                key: [0; 16],
                salt: [0; 4],
                rec_seq: [0; 8],
            }),
            Cipher::Aes256Gcm => CryptoInfo::Aes256Gcm(libc::tls12_crypto_info_aes_gcm_256 {
                info: info(libc::TLS_CIPHER_AES_GCM_256),
                iv: [0; 8],
                key: [0; 32],
                salt: [0; 4],
                rec_seq: [0; 8],
            }),
            Cipher::Chacha20Poly1305 => CryptoInfo::Chacha20Poly1305(libc::tls12_crypto_info_chacha20_poly1305 {
                info: info(libc::TLS_CIPHER_CHACHA20_POLY1305),
                iv: [0; 12],
                key: [0; 32],
                salt: [],
                rec_seq: [0; 8],
            }),
        }
    }

    /// Writes the key material into the struct where it lies.
    fn fill(&mut self, key: &[u8], iv: &[u8], seq: u64) -> Result<(), String> {
        let cipher = self.cipher();
        let (key_field, salt, iv_field, rec_seq): (&mut [u8], &mut [u8], &mut [u8], &mut [u8; 8]) = match self {
            CryptoInfo::Aes128Gcm(c) => (&mut c.key, &mut c.salt, &mut c.iv, &mut c.rec_seq),
            CryptoInfo::Aes256Gcm(c) => (&mut c.key, &mut c.salt, &mut c.iv, &mut c.rec_seq),
            CryptoInfo::Chacha20Poly1305(c) => (&mut c.key, &mut c.salt, &mut c.iv, &mut c.rec_seq),
        };
        if key.len() != key_field.len() || iv.len() != 12 {
            return Err(format!("{:?} wants a {}-byte key and a 12-byte IV, got {} and {}", cipher, key_field.len(), key.len(), iv.len()));
        }
        key_field.copy_from_slice(key);
        salt.copy_from_slice(&iv[..salt.len()]);
        iv_field.copy_from_slice(&iv[salt.len()..]);
        *rec_seq = seq.to_be_bytes();
        Ok(())
    }

    fn cipher(&self) -> Cipher {
        match self {
            CryptoInfo::Aes128Gcm(_) => Cipher::Aes128Gcm,
            CryptoInfo::Aes256Gcm(_) => Cipher::Aes256Gcm,
            CryptoInfo::Chacha20Poly1305(_) => Cipher::Chacha20Poly1305,
        }
    }

    /// The struct's bytes, as `setsockopt` takes them.
    fn as_ptr_len(&self) -> (*const libc::c_void, libc::socklen_t) {
        fn raw<T>(t: &T) -> (*const libc::c_void, libc::socklen_t) {
            ((t as *const T).cast(), std::mem::size_of::<T>() as libc::socklen_t)
        }
        match self {
            CryptoInfo::Aes128Gcm(c) => raw(c),
            CryptoInfo::Aes256Gcm(c) => raw(c),
            CryptoInfo::Chacha20Poly1305(c) => raw(c),
        }
    }
}

impl Drop for CryptoInfo {
    // Key, salt, IV (and the header) wiped with writes the optimiser keeps.
    fn drop(&mut self) {
        // SAFETY: each `linux/tls.h` struct is integers and byte arrays
        // only (no pointers, no Drop), all-zero is a valid value of each,
        // and `self` gives exclusive access to it.
        unsafe {
            match self {
                CryptoInfo::Aes128Gcm(c) => zeroize::zeroize_flat_type(c),
                CryptoInfo::Aes256Gcm(c) => zeroize::zeroize_flat_type(c),
                CryptoInfo::Chacha20Poly1305(c) => zeroize::zeroize_flat_type(c),
            }
        }
    }
}

/// Secrets rustls hands over: [`rustls::ExtractedSecrets`] at the switch,
/// `(u64, ConnectionTrafficSecrets)` at each key update. Each is sequence
/// numbers and `ConnectionTrafficSecrets`, an enum of fixed-size byte
/// arrays and lengths (no pointers, no heap).
trait FlatSecrets {}
impl FlatSecrets for rustls::ExtractedSecrets {}
impl FlatSecrets for (u64, ConnectionTrafficSecrets) {}

/// Wipes the secrets rustls handed over, then forgets them: rustls zeroizes
/// an `AeadKey` when it drops, but not an `Iv` (rustls 0.23.46,
/// `crypto/cipher.rs`), and gives no `&mut` to either.
fn wipe<T: FlatSecrets>(secrets: &mut std::mem::ManuallyDrop<T>) {
    // SAFETY: `T` is flat (see FlatSecrets). All-zero may not be a valid
    // enum, so the value is never used again: it stays in `ManuallyDrop`
    // and is never dropped (dropping would only zeroize the keys again).
    unsafe { zeroize::zeroize_flat_type(&mut **secrets as *mut T) }
}

fn set_ulp(fd: RawFd) -> io::Result<()> {
    let name = b"tls";
    // SAFETY: `name` outlives the call and its length is passed with it.
    let rc = unsafe { libc::setsockopt(fd, libc::SOL_TCP, libc::TCP_ULP, name.as_ptr().cast(), name.len() as libc::socklen_t) };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

fn set_crypto(fd: RawFd, direction: libc::c_int, info: &CryptoInfo) -> io::Result<()> {
    let (ptr, len) = info.as_ptr_len();
    // SAFETY: `ptr` points at a live `linux/tls.h` crypto-info struct of `len` bytes.
    let rc = unsafe { libc::setsockopt(fd, libc::SOL_TLS, direction, ptr, len) };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// Why a connection could not be moved to kernel TLS (it is then closed).
#[derive(Debug, thiserror::Error)]
pub enum OffloadError {
    #[error("the client closed the connection during the switch to kernel TLS")]
    Closed,
    #[error("extracting the traffic secrets: {0}")]
    Secrets(#[source] rustls::Error),
    #[error("{0}")]
    Unsupported(String),
    #[error("setsockopt {what}: {source}")]
    Kernel {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// A finished handshake whose records the kernel is to take over, ending
/// at a record boundary ([`handshake`]).
pub struct Handshake {
    tcp: LaneTcp,
    conn: UnbufferedServerConnection,
    /// Application data rustls decrypted with the handshake's last records.
    drained: Vec<u8>,
    /// The client's close_notify came with them.
    read_closed: bool,
}

impl Handshake {
    /// The client's certificate chain, as rustls verified it.
    pub fn peer_certificates(&self) -> &[rustls::pki_types::CertificateDer<'static>] {
        self.conn.peer_certificates().unwrap_or_default()
    }
}

/// A rustls error as tokio-rustls reports one (`InvalidData` wrapping it),
/// so that handshake failures are classified alike on either path.
fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// The largest TLS record on the wire: 2^14 bytes of plaintext plus the
/// 5-byte header and at most 256 bytes of expansion (RFC 8446 §5.2).
const MAX_WIRE_RECORD: usize = MAX_RECORD + 5 + 256;

/// Runs a server handshake in rustls's unbuffered API on a socket whose
/// reads are bounded to records, until it is complete, nothing is left to
/// send, and the bytes read end at a record boundary (see the module
/// documentation). Errors are rustls's (`InvalidData`, after its alert has
/// been sent) or the socket's.
pub async fn handshake(mut tcp: LaneTcp, config: Arc<ServerConfig>) -> io::Result<Handshake> {
    let mut conn = UnbufferedServerConnection::new(config).map_err(tls_error)?;
    let (mut incoming, mut filled) = (vec![0u8; MAX_WIRE_RECORD], 0usize);
    let mut outgoing = Vec::new();
    let (mut drained, mut read_closed) = (Vec::new(), false);
    loop {
        let UnbufferedStatus { discard, state } = conn.process_tls_records(&mut incoming[..filled]);
        let read_more = match state {
            Err(e) => {
                // rustls's alert follows, from the same buffer (its
                // deframer still refers to it).
                incoming.copy_within(discard..filled, 0);
                send_pending_alert(&mut conn, &mut tcp, &mut incoming[..filled - discard]).await;
                return Err(tls_error(e));
            }
            Ok(ConnectionState::EncodeTlsData(mut data)) => {
                encode(|out| data.encode(out), &mut outgoing).map_err(|e| io::Error::other(format!("encoding a handshake record: {e}")))?;
                false
            }
            Ok(ConnectionState::TransmitTlsData(data)) => {
                tcp.write_all(&outgoing).await?;
                outgoing.clear();
                data.done();
                false
            }
            Ok(ConnectionState::ReadTraffic(mut records)) => {
                while let Some(record) = records.next_record() {
                    drained.extend_from_slice(record.map_err(tls_error)?.payload);
                }
                false
            }
            Ok(ConnectionState::PeerClosed | ConnectionState::Closed) => {
                read_closed = true;
                false
            }
            Ok(ConnectionState::BlockedHandshake) => true,
            // The server may send before the client's Finished (TLS 1.3):
            // done only once the handshake is and no record is half read.
            Ok(ConnectionState::WriteTraffic(_)) => {
                let done = filled == discard && !conn.is_handshaking() && tcp.at_record_boundary();
                if done || read_closed {
                    break;
                }
                true
            }
            Ok(other) => return Err(io::Error::other(format!("unexpected TLS state during the handshake: {other:?}"))),
        };
        incoming.copy_within(discard..filled, 0);
        filled -= discard;
        if !read_more {
            continue;
        }
        if read_closed {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "tls handshake eof"));
        }
        if filled == incoming.len() {
            incoming.resize(filled + MAX_WIRE_RECORD, 0);
        }
        let n = tcp.read(&mut incoming[filled..]).await?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "tls handshake eof"));
        }
        filled += n;
    }
    Ok(Handshake { tcp, conn, drained, read_closed })
}

/// Encodes one record into `outgoing`, growing it as rustls asks.
fn encode(mut encode: impl FnMut(&mut [u8]) -> Result<usize, EncodeError>, outgoing: &mut Vec<u8>) -> Result<(), EncodeError> {
    let at = outgoing.len();
    outgoing.resize(at + MAX_WIRE_RECORD, 0);
    let n = match encode(&mut outgoing[at..]) {
        Err(EncodeError::InsufficientSize(e)) => {
            outgoing.resize(at + e.required_size, 0);
            encode(&mut outgoing[at..])?
        }
        other => other?,
    };
    outgoing.truncate(at + n);
    Ok(())
}

/// Sends the alert rustls queued with an error, as tokio-rustls does; the
/// handshake is failing anyway, so errors here are ignored. Bounded: rustls
/// queues one alert.
async fn send_pending_alert(conn: &mut UnbufferedServerConnection, tcp: &mut LaneTcp, incoming: &mut [u8]) {
    let mut outgoing = Vec::new();
    for _ in 0..4 {
        // Nothing is discarded from `incoming` here: rustls has failed and
        // reads no further record. After the alert it reports its error
        // again, not `TransmitTlsData`.
        match conn.process_tls_records(incoming).state {
            Ok(ConnectionState::EncodeTlsData(mut data)) => {
                if encode(|out| data.encode(out), &mut outgoing).is_err() {
                    break;
                }
            }
            Ok(ConnectionState::TransmitTlsData(data)) => {
                data.done();
                break;
            }
            _ => break,
        }
    }
    let _ = tcp.write_all(&outgoing).await;
}

/// Moves a finished handshake's record layer into the kernel (see the
/// module documentation): rustls keeps only what key updates need.
/// `close_after_records`: the test hook of `tls.kernel_tls_close_after_records`;
/// `tenant`: the label of `imgsvc_tls_key_updates_total`.
pub fn offload(
    handshake: Handshake,
    kernel: KernelTls,
    close_after_records: Option<u64>,
    tenant: String,
) -> Result<KernelTlsStream, OffloadError> {
    let Handshake { mut tcp, conn, drained, read_closed } = handshake;
    if read_closed && drained.is_empty() {
        return Err(OffloadError::Closed);
    }
    tcp.stop_bounding_reads();
    let suite = conn.negotiated_cipher_suite().ok_or_else(|| OffloadError::Unsupported("no cipher suite negotiated".into()))?;
    let cipher = kernel_cipher(suite.suite())
        .filter(|c| kernel.ciphers.has(*c))
        .ok_or_else(|| OffloadError::Unsupported(format!("{:?}, which the kernel does not take", suite.suite())))?;
    let version = match conn.protocol_version() {
        Some(ProtocolVersion::TLSv1_3) => libc::TLS_1_3_VERSION,
        Some(ProtocolVersion::TLSv1_2) => libc::TLS_1_2_VERSION,
        other => return Err(OffloadError::Unsupported(format!("protocol version {other:?}"))),
    };
    let (close_at, hard_limit) = suite_limits(&suite, close_after_records);
    let (secrets, kernel_conn) = conn.dangerous_into_kernel_connection().map_err(OffloadError::Secrets)?;
    // The secrets are read where they lie and wiped once copied into the
    // kernel's structs (see `wipe`).
    let mut secrets = std::mem::ManuallyDrop::new(secrets);
    let records_sent = secrets.tx.0;
    let infos = crypto_info(cipher, version, &secrets.tx, Direction::Sending)
        .and_then(|tx| Ok((tx, crypto_info(cipher, version, &secrets.rx, Direction::Receiving)?)));
    wipe(&mut secrets);
    let (tx, rx) = infos?;
    let fd = tcp.as_raw_fd();
    set_ulp(fd).map_err(|source| OffloadError::Kernel { what: "TCP_ULP tls", source })?;
    set_crypto(fd, libc::TLS_TX, &tx).map_err(|source| OffloadError::Kernel { what: "TLS_TX", source })?;
    set_crypto(fd, libc::TLS_RX, &rx).map_err(|source| OffloadError::Kernel { what: "TLS_RX", source })?;
    let tls13 = version == libc::TLS_1_3_VERSION;
    Ok(KernelTlsStream {
        tcp,
        drained,
        drained_from: 0,
        read_closed,
        read_stalled: false,
        write_closed: false,
        tls13,
        warnings_left: WARNING_ALERTS_ALLOWED,
        records_sent,
        close_at,
        hard_limit,
        key_limit: KeyLimitGuard(Arc::new(KeyLimit::default())),
        keys: (tls13 && kernel.rekey).then(|| Keys { conn: kernel_conn, cipher, send_update: false, tenant }),
    })
}

/// Which of a connection's keys.
#[derive(Clone, Copy)]
enum Direction {
    Sending,
    Receiving,
}

/// The kernel's struct for one direction's secrets, refused when the
/// cipher is not the one negotiated.
fn crypto_info(
    cipher: Cipher,
    version: u16,
    (seq, secrets): &(u64, ConnectionTrafficSecrets),
    direction: Direction,
) -> Result<Box<CryptoInfo>, OffloadError> {
    let make = match direction {
        Direction::Sending => CryptoInfo::for_sending,
        Direction::Receiving => CryptoInfo::new,
    };
    match Cipher::of(secrets) {
        Some((c, key, iv)) if c == cipher => make(cipher, version, key, iv, *seq).map_err(OffloadError::Unsupported),
        _ => Err(OffloadError::Unsupported(format!("secrets for another cipher than {cipher:?}"))),
    }
}

/// What a TLS 1.3 connection needs to change keys in the kernel.
struct Keys {
    /// rustls's side of the connection: derives each next traffic secret.
    conn: KernelConnection<ServerConnectionData>,
    cipher: Cipher,
    /// The server's own KeyUpdate is due before its next record (the
    /// client asked for one, or the sending key neared its limit).
    send_update: bool,
    /// The label of `imgsvc_tls_key_updates_total`.
    tenant: String,
}

impl Keys {
    /// Installs the next key of one direction in the kernel, as rustls's
    /// `KernelConnection` derives it: receiving, to follow the client's
    /// KeyUpdate (the kernel holds the client's next records until then);
    /// sending, once the server's own KeyUpdate has gone out under the old
    /// key.
    fn update(&mut self, fd: RawFd, direction: Direction) -> io::Result<()> {
        let (next, option, label) = match direction {
            Direction::Receiving => (self.conn.update_rx_secret(), libc::TLS_RX, "received"),
            Direction::Sending => (self.conn.update_tx_secret(), libc::TLS_TX, "sent"),
        };
        let mut secrets = std::mem::ManuallyDrop::new(next.map_err(tls_error)?);
        let info = crypto_info(self.cipher, libc::TLS_1_3_VERSION, &secrets, direction);
        wipe(&mut secrets);
        set_crypto(fd, option, &*info.map_err(io::Error::other)?)?;
        metrics::counter!("imgsvc_tls_key_updates_total", "tenant" => self.tenant.clone(), "direction" => label).increment(1);
        Ok(())
    }
}

/// When to change the sending key (or, where it cannot change, ask for a
/// graceful close), and the record count the server's sending key must
/// never reach, for a suite: rustls's confidentiality limit
/// (`CipherSuiteCommon::confidentiality_limit`: 2^24 records for AES-GCM,
/// none for ChaCha20-Poly1305), at which rustls would rekey or close. Both
/// happen 1/16 of the limit early (2^20 records, 16 GB of full records at
/// 2^24: room for the calls in flight to finish); `close_after_records` (a
/// test hook) brings them earlier.
fn suite_limits(suite: &rustls::SupportedCipherSuite, close_after_records: Option<u64>) -> (u64, u64) {
    let limit = match suite {
        rustls::SupportedCipherSuite::Tls13(s) => s.common.confidentiality_limit,
        rustls::SupportedCipherSuite::Tls12(s) => s.common.confidentiality_limit,
    };
    let close_at = limit - limit / 16;
    (close_after_records.map_or(close_at, |n| n.min(close_at)), limit)
}

/// A connection whose records the kernel encrypts and decrypts.
pub struct KernelTlsStream {
    tcp: LaneTcp,
    /// Plaintext rustls decrypted before the switch, served first.
    drained: Vec<u8>,
    drained_from: usize,
    read_closed: bool,
    /// After a client's KeyUpdate: reads wait for the graceful close.
    read_stalled: bool,
    write_closed: bool,
    tls13: bool,
    /// Warning alerts still tolerated in a row (TLS 1.2), as rustls counts.
    warnings_left: u8,
    /// An upper bound of the records sealed with the sending key so far
    /// (rustls's sequence number at the switch, then at most one record per
    /// 16 KiB of each write: the kernel closes a record at the end of each
    /// `sendmsg` and at 2^14 bytes).
    records_sent: u64,
    /// At this many records the sending key is changed (TLS 1.3 on a
    /// kernel that takes new keys) or the connection asks for a graceful
    /// close.
    close_at: u64,
    /// Writes that would reach this many records fail instead.
    hard_limit: u64,
    key_limit: KeyLimitGuard,
    /// Key updates, where the kernel takes them (`None`: TLS 1.2, or a
    /// kernel before 6.14).
    keys: Option<Keys>,
}

/// Tells a waiter on [`KeyLimit::reached`] when the stream is gone.
struct KeyLimitGuard(Arc<KeyLimit>);

impl Drop for KeyLimitGuard {
    fn drop(&mut self) {
        self.0.set(2);
    }
}

/// How many warning alerts in a row rustls accepts before it fails the
/// connection (rustls 0.23.46, `TemperCounters::allowed_warning_alerts`).
const WARNING_ALERTS_ALLOWED: u8 = 4;
/// The largest plaintext of one TLS record (RFC 8446 §5.1).
const MAX_RECORD: usize = 1 << 14;

/// Alert descriptions (RFC 8446 §6).
const UNEXPECTED_MESSAGE: u8 = 10;
const BAD_RECORD_MAC: u8 = 20;
const RECORD_OVERFLOW: u8 = 22;
const ILLEGAL_PARAMETER: u8 = 47;
const DECODE_ERROR: u8 = 50;
const USER_CANCELED: u8 = 90;
const INTERNAL_ERROR: u8 = 80;

/// rustls's message for a TCP end without close_notify (`UNEXPECTED_EOF_MESSAGE`).
const TRUNCATED: &str = "peer closed connection without sending TLS close_notify: \
https://docs.rs/rustls/latest/rustls/manual/_03_howto/index.html#unexpected-eof";

/// How long the calls in flight have once a kernel-TLS connection closes
/// for its keys ([`KeyLimit`]).
pub const KEY_LIMIT_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// A connection's request to be closed gracefully because its sending key
/// nears its limit and cannot change (TLS 1.2, or a kernel that takes no
/// new keys), or because the client changed its keys (a KeyUpdate such a
/// kernel cannot follow): the server closes it with
/// `CloseReason::KeyLimit` (HTTP/2 GOAWAY, calls in flight finish).
#[derive(Default)]
pub struct KeyLimit {
    notify: tokio::sync::Notify,
    /// 0: nothing; 1: the close is asked for; 2: the stream is gone.
    state: std::sync::atomic::AtomicU8,
}

impl KeyLimit {
    fn set(&self, state: u8) {
        if self.state.compare_exchange(0, state, std::sync::atomic::Ordering::AcqRel, std::sync::atomic::Ordering::Acquire).is_ok() {
            self.notify.notify_one();
        }
    }

    /// Waits until the close is asked for (`true`) or the stream is
    /// dropped without it (`false`).
    pub async fn reached(&self) -> bool {
        loop {
            match self.state.load(std::sync::atomic::Ordering::Acquire) {
                0 => self.notify.notified().await,
                state => return state == 1,
            }
        }
    }
}

/// What a record that is not application data means, decided as rustls
/// decides (`CommonState::process_alert`, its record layer).
#[derive(Debug, PartialEq, Eq)]
enum Control {
    /// close_notify: the end of the client's stream.
    CloseNotify,
    /// Application data after all (read with its type): serve it.
    Data(Vec<u8>),
    /// A TLS 1.2 warning alert (or TLS 1.3 user_canceled): ignored.
    Ignore,
    /// The client's TLS 1.3 KeyUpdate: its next records use its next key;
    /// `update_requested`: it asks the server to change its own.
    KeyUpdate { update_requested: bool },
    /// The connection fails; `alert` is sent first when set.
    Fatal { alert: Option<u8>, kind: io::ErrorKind, why: String },
}

/// The decision for one record read with its type (`None`: the kernel gave
/// none). `warnings_left` counts TLS 1.2 warnings in a row.
fn decide(tls13: bool, warnings_left: &mut u8, record_type: Option<u8>, payload: &[u8]) -> Control {
    let fatal = |alert, kind, why: String| Control::Fatal { alert, kind, why };
    match (record_type, payload) {
        (Some(APPLICATION_DATA), bytes) => {
            *warnings_left = WARNING_ALERTS_ALLOWED;
            Control::Data(bytes.to_vec())
        }
        (Some(ALERT), &[_, CLOSE_NOTIFY]) => Control::CloseNotify,
        (Some(ALERT), &[level @ (1 | 2), description]) => {
            if level == 2 {
                // InvalidData, as rustls reports every TLS error.
                return fatal(None, io::ErrorKind::InvalidData, format!("TLS alert from the client: fatal, description {description}"));
            }
            if *warnings_left == 0 {
                return fatal(
                    None,
                    io::ErrorKind::InvalidData,
                    format!("too many TLS warning alerts from the client in a row (more than {WARNING_ALERTS_ALLOWED})"),
                );
            }
            *warnings_left -= 1;
            if tls13 && description != USER_CANCELED {
                return fatal(
                    Some(DECODE_ERROR),
                    io::ErrorKind::InvalidData,
                    format!("TLS 1.3 forbids warning alerts; the client sent description {description}"),
                );
            }
            Control::Ignore
        }
        (Some(ALERT), &[level, _]) => {
            fatal(Some(ILLEGAL_PARAMETER), io::ErrorKind::InvalidData, format!("TLS alert of unknown level {level} from the client"))
        }
        (Some(ALERT), bytes) => {
            fatal(Some(DECODE_ERROR), io::ErrorKind::InvalidData, format!("a TLS alert record of {} bytes (2 expected)", bytes.len()))
        }
        // One KeyUpdate, alone at the end of its record (RFC 8446 §5.1: a
        // handshake message before a key change ends its record).
        (Some(HANDSHAKE), &[KEY_UPDATE, 0, 0, 1, request]) if tls13 => match request {
            0 | 1 => Control::KeyUpdate { update_requested: request == 1 },
            _ => fatal(Some(ILLEGAL_PARAMETER), io::ErrorKind::InvalidData, format!("a KeyUpdate with request_update {request}")),
        },
        (Some(HANDSHAKE), [KEY_UPDATE, ..]) if tls13 => fatal(
            Some(UNEXPECTED_MESSAGE),
            io::ErrorKind::InvalidData,
            format!("a KeyUpdate record of {} bytes (5 expected: one message, alone in its record)", payload.len()),
        ),
        (Some(t), _) => {
            fatal(Some(UNEXPECTED_MESSAGE), io::ErrorKind::InvalidData, format!("unexpected TLS record of type {t} after the handshake"))
        }
        (None, _) => fatal(Some(UNEXPECTED_MESSAGE), io::ErrorKind::InvalidData, "a kernel-TLS read failed without a record type".into()),
    }
}

/// The alert rustls sends for a record the kernel failed to open
/// (`EBADMSG`: it does not authenticate; `EMSGSIZE`: too long).
fn alert_for_read_error(e: &io::Error) -> Option<u8> {
    match e.raw_os_error() {
        Some(libc::EBADMSG) => Some(BAD_RECORD_MAC),
        Some(libc::EMSGSIZE) => Some(RECORD_OVERFLOW),
        _ => None,
    }
}

/// The records one write of `n` bytes may seal, at most.
fn records_of(n: usize) -> u64 {
    n.div_ceil(MAX_RECORD) as u64
}

impl KernelTlsStream {
    pub fn get_mut(&mut self) -> &mut LaneTcp {
        &mut self.tcp
    }

    pub fn into_inner(self) -> LaneTcp {
        self.tcp
    }

    /// Asked for when the connection must close gracefully (see [`KeyLimit`]).
    pub fn key_limit(&self) -> Arc<KeyLimit> {
        self.key_limit.0.clone()
    }

    /// Reads the next record with `recvmsg`, which also reports its type.
    fn control_record(&mut self) -> io::Result<Control> {
        let fd = self.tcp.as_raw_fd();
        let (tls13, warnings_left) = (self.tls13, &mut self.warnings_left);
        self.tcp.try_io(Interest::READABLE, || {
            let mut data = [0u8; MAX_RECORD];
            let (n, record_type) = recv_record(fd, &mut data)?;
            if n == 0 && record_type.is_none() {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, TRUNCATED));
            }
            Ok(decide(tls13, warnings_left, record_type, &data[..n]))
        })
    }

    /// Sends a fatal alert, once, as rustls does before failing; the
    /// connection is failing anyway, so an error sending it is ignored (a
    /// socket whose read failed may refuse one write with that error).
    fn send_fatal_alert(&mut self, description: u8) {
        if self.write_closed {
            return;
        }
        self.write_closed = true;
        let fd = self.tcp.as_raw_fd();
        for _ in 0..2 {
            if self.tcp.try_io(Interest::WRITABLE, || send_record(fd, ALERT, &[2, description])).is_ok() {
                break;
            }
        }
    }

    /// Counts the records a write of `n` bytes sealed; asks for the
    /// graceful close once past `close_at`.
    fn sent(&mut self, n: usize) {
        self.records_sent = self.records_sent.saturating_add(records_of(n));
        if self.records_sent >= self.close_at {
            match self.keys.as_mut() {
                Some(keys) => keys.send_update = true,
                None => self.key_limit.0.set(1),
            }
        }
    }

    /// Sends the server's KeyUpdate and changes its sending key, when one
    /// is due ([`Keys::send_update`]): before any record under the next key.
    fn poll_key_update(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.keys.as_ref().is_some_and(|k| k.send_update) {
            let fd = self.tcp.as_raw_fd();
            // update_not_requested: the client's keys are its own business.
            match self.tcp.try_io(Interest::WRITABLE, || send_record(fd, HANDSHAKE, &[KEY_UPDATE, 0, 0, 1, 0])) {
                Ok(()) => {
                    let keys = self.keys.as_mut().expect("checked above");
                    keys.send_update = false;
                    keys.update(fd, Direction::Sending)?;
                    self.records_sent = 0;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => ready!(self.tcp.poll_write_ready(cx))?,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Poll::Ready(Ok(()))
    }

    /// How much of a write of `len` bytes may go out without the sending
    /// key reaching its hard limit (0: none; the write fails).
    fn writable(&self, len: usize) -> usize {
        let left = self.hard_limit.saturating_sub(self.records_sent).saturating_sub(1); // a close_notify still fits
        len.min(usize::try_from(left).unwrap_or(usize::MAX).saturating_mul(MAX_RECORD))
    }

    /// Sends a close_notify alert (once), through the kernel's record layer.
    fn poll_close_notify(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.write_closed {
            let fd = self.tcp.as_raw_fd();
            match self.tcp.try_io(Interest::WRITABLE, || send_record(fd, ALERT, &[1, CLOSE_NOTIFY])) {
                Ok(()) => self.write_closed = true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => ready!(self.tcp.poll_write_ready(cx))?,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// `recvmsg` with room for the `TLS_GET_RECORD_TYPE` control message:
/// (bytes read, the record's type if the kernel said).
fn recv_record(fd: RawFd, data: &mut [u8]) -> io::Result<(usize, Option<u8>)> {
    let mut iov = libc::iovec { iov_base: data.as_mut_ptr().cast(), iov_len: data.len() };
    let mut control = [0u64; 8]; // 64 bytes, aligned for cmsghdr
    // SAFETY: msghdr is plain data; zeroed is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: every pointer in `msg` refers to a live buffer of the stated size.
    let n = unsafe { libc::recvmsg(fd, &mut msg, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut record_type = None;
    // SAFETY: the CMSG_* macros walk the control buffer the kernel filled,
    // within msg_controllen; CMSG_DATA of a SOL_TLS/TLS_GET_RECORD_TYPE
    // message holds one byte.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_TLS && (*cmsg).cmsg_type == libc::TLS_GET_RECORD_TYPE {
                record_type = Some(*libc::CMSG_DATA(cmsg));
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok((n as usize, record_type))
}

/// `sendmsg` of one record of type `record_type` (`TLS_SET_RECORD_TYPE`).
fn send_record(fd: RawFd, record_type: u8, payload: &[u8]) -> io::Result<()> {
    let mut iov = libc::iovec { iov_base: payload.as_ptr().cast_mut().cast(), iov_len: payload.len() };
    let mut control = [0u64; 8];
    // SAFETY: as in recv_record; the one control message written fits in
    // `control` (CMSG_SPACE(1) <= 64) and is the only one.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(1) as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_TLS;
        (*cmsg).cmsg_type = libc::TLS_SET_RECORD_TYPE;
        (*cmsg).cmsg_len = libc::CMSG_LEN(1) as _;
        *libc::CMSG_DATA(cmsg) = record_type;
        let n = libc::sendmsg(fd, &msg, 0);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

impl AsyncRead for KernelTlsStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.drained_from < this.drained.len() {
                let n = buf.remaining().min(this.drained.len() - this.drained_from);
                buf.put_slice(&this.drained[this.drained_from..this.drained_from + n]);
                this.drained_from += n;
                if this.drained_from == this.drained.len() {
                    (this.drained, this.drained_from) = (Vec::new(), 0);
                }
                return Poll::Ready(Ok(()));
            }
            if this.read_closed {
                return Poll::Ready(Ok(()));
            }
            if this.read_stalled {
                // After a KeyUpdate: nothing more can be opened; the
                // connection is closing gracefully (see KeyLimit).
                return Poll::Pending;
            }
            let filled = buf.filled().len();
            match ready!(Pin::new(&mut this.tcp).poll_read(cx, buf)) {
                // The TCP stream ended without close_notify: truncation,
                // an error as in rustls.
                Ok(()) if buf.filled().len() == filled && buf.remaining() > 0 => {
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::UnexpectedEof, TRUNCATED)));
                }
                Ok(()) => {
                    this.warnings_left = WARNING_ALERTS_ALLOWED;
                    return Poll::Ready(Ok(()));
                }
                // The next record is not application data.
                Err(e) if e.raw_os_error() == Some(libc::EIO) => match this.control_record() {
                    Ok(Control::CloseNotify) => this.read_closed = true,
                    Ok(Control::Data(bytes)) => this.drained = bytes,
                    Ok(Control::Ignore) => {}
                    Ok(Control::KeyUpdate { update_requested }) => match this.keys.as_mut() {
                        Some(keys) => {
                            if let Err(e) = keys.update(this.tcp.as_raw_fd(), Direction::Receiving) {
                                this.send_fatal_alert(INTERNAL_ERROR);
                                return Poll::Ready(Err(e));
                            }
                            keys.send_update |= update_requested;
                        }
                        None => {
                            tracing::info!(
                                "the client changed its TLS keys (KeyUpdate), which this kernel cannot follow: closing the connection gracefully"
                            );
                            this.read_stalled = true;
                            this.key_limit.0.set(1);
                        }
                    },
                    Ok(Control::Fatal { alert, kind, why }) => {
                        if let Some(alert) = alert {
                            this.send_fatal_alert(alert);
                        }
                        return Poll::Ready(Err(io::Error::new(kind, why)));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Poll::Ready(Err(e)),
                },
                Err(e) => {
                    if let Some(alert) = alert_for_read_error(&e) {
                        this.send_fatal_alert(alert);
                    }
                    return Poll::Ready(Err(e));
                }
            }
        }
    }
}

fn key_exhausted() -> io::Error {
    io::Error::other("the TLS sending key reached its confidentiality limit and cannot be changed: no more records under it")
}

impl AsyncWrite for KernelTlsStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.write_closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        ready!(this.poll_key_update(cx))?;
        let len = this.writable(buf.len());
        if len == 0 && !buf.is_empty() {
            return Poll::Ready(Err(key_exhausted()));
        }
        let n = ready!(Pin::new(&mut this.tcp).poll_write(cx, &buf[..len]))?;
        this.sent(n);
        Poll::Ready(Ok(n))
    }
    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.write_closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        ready!(this.poll_key_update(cx))?;
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if this.writable(total) < total {
            // Near the hard limit: one buffer at a time, cut to what fits.
            let first = bufs.iter().find(|b| !b.is_empty()).map_or(&[][..], |b| &b[..]);
            return Pin::new(this).poll_write(cx, first);
        }
        let n = ready!(Pin::new(&mut this.tcp).poll_write_vectored(cx, bufs))?;
        this.sent(n);
        Poll::Ready(Ok(n))
    }
    fn is_write_vectored(&self) -> bool {
        true
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_close_notify(cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes `setsockopt` hands the kernel.
    fn bytes(info: &CryptoInfo) -> Vec<u8> {
        let (ptr, len) = info.as_ptr_len();
        // SAFETY: `ptr` is a live struct of `len` bytes, all initialised
        // (the `linux/tls.h` structs have no padding: checked below).
        unsafe { std::slice::from_raw_parts(ptr.cast::<u8>(), len as usize) }.to_vec()
    }

    #[test]
    fn crypto_info_matches_the_uapi_layout_of_linux_tls_h() {
        use std::mem::{offset_of, size_of};
        // linux/tls.h: struct tls_crypto_info { __u16 version; __u16 cipher_type; };
        // then iv, key, salt, rec_seq as unsigned char arrays, in that order.
        assert_eq!((offset_of!(libc::tls_crypto_info, version), offset_of!(libc::tls_crypto_info, cipher_type)), (0, 2));
        type A128 = libc::tls12_crypto_info_aes_gcm_128;
        type A256 = libc::tls12_crypto_info_aes_gcm_256;
        type Cha = libc::tls12_crypto_info_chacha20_poly1305;
        assert_eq!(
            [
                offset_of!(A128, info),
                offset_of!(A128, iv),
                offset_of!(A128, key),
                offset_of!(A128, salt),
                offset_of!(A128, rec_seq),
                size_of::<A128>()
            ],
            [0, 4, 12, 28, 32, 40]
        );
        assert_eq!(
            [
                offset_of!(A256, info),
                offset_of!(A256, iv),
                offset_of!(A256, key),
                offset_of!(A256, salt),
                offset_of!(A256, rec_seq),
                size_of::<A256>()
            ],
            [0, 4, 12, 44, 48, 56]
        );
        assert_eq!(
            [
                offset_of!(Cha, info),
                offset_of!(Cha, iv),
                offset_of!(Cha, key),
                offset_of!(Cha, salt),
                offset_of!(Cha, rec_seq),
                size_of::<Cha>()
            ],
            [0, 4, 16, 48, 48, 56]
        );
        // The constants of linux/tls.h and linux/tcp.h.
        assert_eq!((libc::TLS_1_2_VERSION, libc::TLS_1_3_VERSION), (0x0303, 0x0304));
        assert_eq!((libc::TLS_CIPHER_AES_GCM_128, libc::TLS_CIPHER_AES_GCM_256, libc::TLS_CIPHER_CHACHA20_POLY1305), (51, 52, 54));
        assert_eq!((libc::SOL_TLS, libc::TLS_TX, libc::TLS_RX, libc::TCP_ULP), (282, 1, 2, 31));
        assert_eq!((libc::TLS_SET_RECORD_TYPE, libc::TLS_GET_RECORD_TYPE), (1, 2));

        // What the kernel reads at those offsets (native-endian header,
        // big-endian sequence number), for each cipher.
        let key: Vec<u8> = (0..32).collect();
        let iv: Vec<u8> = (100..112).collect();
        let seq = 0x0102_0304_0506_0708u64;
        let header = |version: u16, cipher: u16| [version.to_ne_bytes(), cipher.to_ne_bytes()].concat();
        let mut expected = header(0x0304, 52);
        expected.extend_from_slice(&iv[4..]); // iv
        expected.extend_from_slice(&key); // key
        expected.extend_from_slice(&iv[..4]); // salt
        expected.extend_from_slice(&seq.to_be_bytes());
        assert_eq!(bytes(&CryptoInfo::new(Cipher::Aes256Gcm, libc::TLS_1_3_VERSION, &key, &iv, seq).unwrap()), expected);

        let mut expected = header(0x0303, 51);
        expected.extend_from_slice(&iv[4..]);
        expected.extend_from_slice(&key[..16]);
        expected.extend_from_slice(&iv[..4]);
        expected.extend_from_slice(&7u64.to_be_bytes());
        assert_eq!(bytes(&CryptoInfo::new(Cipher::Aes128Gcm, libc::TLS_1_2_VERSION, &key[..16], &iv, 7).unwrap()), expected);

        let mut expected = header(0x0304, 54);
        expected.extend_from_slice(&iv); // all twelve bytes; no salt
        expected.extend_from_slice(&key);
        expected.extend_from_slice(&1u64.to_be_bytes());
        assert_eq!(bytes(&CryptoInfo::new(Cipher::Chacha20Poly1305, libc::TLS_1_3_VERSION, &key, &iv, 1).unwrap()), expected);
    }

    #[test]
    fn wrong_key_or_iv_lengths_are_refused() {
        let (key, iv) = ([9u8; 32], [5u8; 12]);
        let err = CryptoInfo::new(Cipher::Aes256Gcm, libc::TLS_1_3_VERSION, &key[..16], &iv, 0).err().unwrap();
        assert_eq!(err, "Aes256Gcm wants a 32-byte key and a 12-byte IV, got 16 and 12");
        let err = CryptoInfo::new(Cipher::Chacha20Poly1305, libc::TLS_1_3_VERSION, &key, &iv[..8], 0).err().unwrap();
        assert_eq!(err, "Chacha20Poly1305 wants a 32-byte key and a 12-byte IV, got 32 and 8");
    }

    /// What a test can observe: the bytes of a value after its `Drop` ran,
    /// in storage the test owns (`ManuallyDrop`, so the memory stays
    /// valid). Copies the compiler may make of a value moved by value are
    /// not observable; the code avoids them by filling the structs in place
    /// on the heap and reading rustls's secrets by reference.
    #[test]
    fn dropping_key_material_wipes_key_salt_and_iv() {
        use std::mem::ManuallyDrop;
        let key: Vec<u8> = (1..33).collect();
        let iv: Vec<u8> = (201..213).collect();
        for cipher in [Cipher::Aes128Gcm, Cipher::Aes256Gcm, Cipher::Chacha20Poly1305] {
            let mut slot = ManuallyDrop::new(CryptoInfo::empty(cipher, libc::TLS_1_3_VERSION));
            slot.fill(&key[..cipher.key_len()], &iv, u64::MAX).unwrap();
            let (ptr, len) = slot.as_ptr_len();
            let before = bytes(&slot);
            assert!(before.windows(cipher.key_len()).any(|w| w == &key[..cipher.key_len()]), "{cipher:?}: the key is not in {before:?}");
            // SAFETY: dropped once, never used again as a CryptoInfo.
            unsafe { ManuallyDrop::drop(&mut slot) };
            // SAFETY: the storage is `slot`'s, still live; the bytes were
            // written by the wipe.
            let after = unsafe { std::slice::from_raw_parts(ptr.cast::<u8>(), len as usize) };
            assert_eq!(after, vec![0; len as usize], "{cipher:?}");
        }

        // rustls's extracted secrets: key and IV of both directions.
        let secrets = rustls::ExtractedSecrets {
            tx: (5, ConnectionTrafficSecrets::Aes256Gcm { key: rustls::crypto::cipher::AeadKey::from([0xA5; 32]), iv: [0x5A; 12].into() }),
            rx: (
                6,
                ConnectionTrafficSecrets::Chacha20Poly1305 {
                    key: rustls::crypto::cipher::AeadKey::from([0xC3; 32]),
                    iv: [0x3C; 12].into(),
                },
            ),
        };
        let mut secrets = ManuallyDrop::new(secrets);
        let ptr = (&*secrets as *const rustls::ExtractedSecrets).cast::<u8>();
        let len = std::mem::size_of::<rustls::ExtractedSecrets>();
        let (Some((_, key, iv)), Some((_, rx_key, rx_iv))) = (Cipher::of(&secrets.tx.1), Cipher::of(&secrets.rx.1)) else { panic!() };
        assert_eq!((key, iv, rx_key, rx_iv), (&[0xA5; 32][..], &[0x5A; 12][..], &[0xC3; 32][..], &[0x3C; 12][..]));
        wipe(&mut secrets);
        // SAFETY: `secrets`'s storage, live and wholly written by the wipe.
        let after = unsafe { std::slice::from_raw_parts(ptr, len) };
        assert_eq!(after, vec![0; len]);

        // A key update's next secret, as `KernelConnection` returns it.
        let update =
            (0u64, ConnectionTrafficSecrets::Aes128Gcm { key: rustls::crypto::cipher::AeadKey::from([0x99; 32]), iv: [0x66; 12].into() });
        let mut update = ManuallyDrop::new(update);
        let ptr = (&*update as *const (u64, ConnectionTrafficSecrets)).cast::<u8>();
        let len = std::mem::size_of::<(u64, ConnectionTrafficSecrets)>();
        let Some((_, key, iv)) = Cipher::of(&update.1) else { panic!() };
        assert_eq!((key, iv), (&[0x99; 32][..], &[0x66; 12][..]));
        wipe(&mut update);
        // SAFETY: as above.
        assert_eq!(unsafe { std::slice::from_raw_parts(ptr, len) }, vec![0; len]);
    }

    #[test]
    fn every_suite_of_the_provider_goes_to_the_kernel_under_its_cipher() {
        // Every suite the server can negotiate (ring's provider, as in
        // src/tls.rs), TLS 1.2 AES-GCM included (its nonces: below).
        let mut kernel: Vec<_> = rustls::crypto::ring::ALL_CIPHER_SUITES
            .iter()
            .map(|suite| (format!("{:?}", suite.suite()), kernel_cipher(suite.suite())))
            .collect();
        kernel.sort_by(|a, b| a.0.cmp(&b.0));
        use Cipher::*;
        let expected = [
            ("TLS13_AES_128_GCM_SHA256", Aes128Gcm),
            ("TLS13_AES_256_GCM_SHA384", Aes256Gcm),
            ("TLS13_CHACHA20_POLY1305_SHA256", Chacha20Poly1305),
            ("TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256", Aes128Gcm),
            ("TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384", Aes256Gcm),
            ("TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256", Chacha20Poly1305),
            ("TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256", Aes128Gcm),
            ("TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384", Aes256Gcm),
            ("TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256", Chacha20Poly1305),
        ];
        assert_eq!(kernel, expected.map(|(n, c)| (n.to_string(), Some(c))).to_vec());
    }

    /// The proof that TLS 1.2 AES-GCM's explicit nonces never repeat under
    /// one key: rustls sent `e XOR s` for each `s < used`; the kernel sends
    /// `first + i` for `i` below the suite's limit (the writes stop there:
    /// `writable`). For each rustls nonce `u`, `u - first` (mod 2^64) must
    /// be at least the limit, so that no `i` reaches it: the whole
    /// sequence, not a sample.
    #[test]
    fn tls12_gcm_kernel_nonces_are_disjoint_from_rustls_s() {
        let suite = rustls::crypto::ring::cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256;
        let (_, limit) = suite_limits(&suite, None);
        assert_eq!(limit, 1 << 24);
        let mut es = vec![0, 1, 2, 0x7fff_ffff_ffff_ffff, u64::MAX, u64::MAX - 1, u64::MAX - 5, 1 << 32];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..200 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            es.push(x);
        }
        for e in es {
            for used in (0..=70).chain([255, 256, 257, 1 << 20]) {
                let first = tls12_gcm_first_kernel_nonce(e, used);
                for s in 0..used.min(300) {
                    let u = e ^ s;
                    assert!(
                        u.wrapping_sub(first) >= limit,
                        "e {e:#x}, used {used}: rustls's nonce {u:#x} is the kernel's record {}",
                        u.wrapping_sub(first)
                    );
                }
                if used > 300 {
                    // The highest rustls nonces of a long prefix, too.
                    for s in used - 300..used {
                        assert!((e ^ s).wrapping_sub(first) >= limit, "e {e:#x}, used {used}, s {s}");
                    }
                }
            }
        }
        // The usual case: the Finished alone (seq 0) went out under rustls.
        assert_eq!(tls12_gcm_first_kernel_nonce(0x1000, 1), 0x1001);
        assert_eq!(tls12_gcm_first_kernel_nonce(u64::MAX, 1), 0);
    }

    #[test]
    fn the_sending_side_of_tls12_aes_gcm_alone_gets_the_disjoint_nonce() {
        let key = [7u8; 32];
        let iv: Vec<u8> = (1..=12).collect(); // salt 1..=4, e = 0x05060708090a0b0c
        let e = u64::from_be_bytes(iv[4..].try_into().unwrap());
        let iv_field = |info: &CryptoInfo| bytes(info)[4..12].to_vec();
        for cipher in [Cipher::Aes128Gcm, Cipher::Aes256Gcm] {
            let key = &key[..cipher.key_len()];
            let sending = CryptoInfo::for_sending(cipher, libc::TLS_1_2_VERSION, key, &iv, 1).unwrap();
            assert_eq!(iv_field(&sending), (e + 1).to_be_bytes(), "{cipher:?}");
            // The record sequence number is rustls's, unchanged.
            assert_eq!(bytes(&sending)[bytes(&sending).len() - 8..], 1u64.to_be_bytes());
            let receiving = CryptoInfo::new(cipher, libc::TLS_1_2_VERSION, key, &iv, 1).unwrap();
            assert_eq!(iv_field(&receiving), e.to_be_bytes(), "{cipher:?}");
            // TLS 1.3 builds nonces as iv XOR seq on both sides.
            let tls13 = CryptoInfo::for_sending(cipher, libc::TLS_1_3_VERSION, key, &iv, 1).unwrap();
            assert_eq!(iv_field(&tls13), e.to_be_bytes(), "{cipher:?}");
        }
        let chacha = CryptoInfo::for_sending(Cipher::Chacha20Poly1305, libc::TLS_1_2_VERSION, &key, &iv, 1).unwrap();
        assert_eq!(bytes(&chacha)[4..16], iv[..]);
    }

    /// Whether this kernel's release is 6.14 or later (TLS 1.3 key updates
    /// in kernel TLS), from `/proc/sys/kernel/osrelease`.
    fn kernel_takes_new_keys() -> bool {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
        let mut numbers = release.split(|c: char| !c.is_ascii_digit()).map(|n| n.parse::<u32>().unwrap_or(0));
        (numbers.next().unwrap(), numbers.next().unwrap()) >= (6, 14)
    }

    #[test]
    fn the_probe_agrees_with_the_kernels_list_of_upper_layer_protocols() {
        // A registered `tls` ULP is listed; an unlisted one may still be a
        // module the kernel loads on first use, so only one way is certain.
        let listed = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_ulp").unwrap_or_default();
        // Where it is listed, every cipher must be taken: a crypto-info
        // layout the kernel rejects fails here instead of falling back.
        match probe() {
            Support::Available(kernel) if listed.split_whitespace().any(|u| u == "tls") => {
                assert_eq!(kernel.ciphers, Ciphers::ALL);
                // New keys on a live socket: Linux 6.14 and later.
                assert_eq!(kernel.rekey, kernel_takes_new_keys(), "{kernel:?}");
            }
            Support::Available(kernel) => assert_ne!(kernel.ciphers, Ciphers::default()),
            Support::Unavailable(why) => {
                assert!(!listed.split_whitespace().any(|u| u == "tls"), "tls is listed ({listed:?}) but the probe says: {why}");
                assert!(why.contains("tcp_available_ulp") && why.contains("modprobe tls"), "{why}");
            }
        }
    }

    #[test]
    fn control_records_are_decided_as_rustls_decides_them() {
        use io::ErrorKind::*;
        let fatal = |alert, kind, why: &str| Control::Fatal { alert, kind, why: why.into() };
        let (tls12, tls13) = (false, true);
        let mut left = WARNING_ALERTS_ALLOWED;
        // close_notify, at either level, in either version: the end of the stream.
        assert_eq!(decide(tls13, &mut left, Some(ALERT), &[1, 0]), Control::CloseNotify);
        assert_eq!(decide(tls12, &mut left, Some(ALERT), &[2, 0]), Control::CloseNotify);
        assert_eq!(decide(tls13, &mut left, Some(APPLICATION_DATA), b"h2"), Control::Data(b"h2".to_vec()));
        // TLS 1.2 warnings are ignored, four in a row; the fifth fails (no alert back).
        for _ in 0..4 {
            assert_eq!(decide(tls12, &mut left, Some(ALERT), &[1, 100]), Control::Ignore);
        }
        assert_eq!(
            decide(tls12, &mut left, Some(ALERT), &[1, 100]),
            fatal(None, InvalidData, "too many TLS warning alerts from the client in a row (more than 4)")
        );
        // Application data resets the count.
        assert_eq!(decide(tls12, &mut left, Some(APPLICATION_DATA), b""), Control::Data(Vec::new()));
        assert_eq!(decide(tls12, &mut left, Some(ALERT), &[1, 100]), Control::Ignore);
        // TLS 1.3: warnings other than user_canceled are a decode_error.
        assert_eq!(decide(tls13, &mut left, Some(ALERT), &[1, USER_CANCELED]), Control::Ignore);
        assert_eq!(
            decide(tls13, &mut left, Some(ALERT), &[1, 100]),
            fatal(Some(DECODE_ERROR), InvalidData, "TLS 1.3 forbids warning alerts; the client sent description 100")
        );
        // Fatal alerts end the connection without an answer.
        assert_eq!(
            decide(tls12, &mut left, Some(ALERT), &[2, 40]),
            fatal(None, InvalidData, "TLS alert from the client: fatal, description 40")
        );
        assert_eq!(
            decide(tls13, &mut left, Some(ALERT), &[3, 40]),
            fatal(Some(ILLEGAL_PARAMETER), InvalidData, "TLS alert of unknown level 3 from the client")
        );
        assert_eq!(
            decide(tls13, &mut left, Some(ALERT), &[1]),
            fatal(Some(DECODE_ERROR), InvalidData, "a TLS alert record of 1 bytes (2 expected)")
        );
        // A KeyUpdate is a TLS 1.3 message; any other record is unexpected.
        assert_eq!(decide(tls13, &mut left, Some(HANDSHAKE), &[KEY_UPDATE, 0, 0, 1, 0]), Control::KeyUpdate { update_requested: false });
        assert_eq!(decide(tls13, &mut left, Some(HANDSHAKE), &[KEY_UPDATE, 0, 0, 1, 1]), Control::KeyUpdate { update_requested: true });
        assert_eq!(
            decide(tls13, &mut left, Some(HANDSHAKE), &[KEY_UPDATE, 0, 0, 1, 2]),
            fatal(Some(ILLEGAL_PARAMETER), InvalidData, "a KeyUpdate with request_update 2")
        );
        // Not alone at the end of its record (two of them), or cut short.
        assert_eq!(
            decide(tls13, &mut left, Some(HANDSHAKE), &[KEY_UPDATE, 0, 0, 1, 0, KEY_UPDATE, 0, 0, 1, 0]),
            fatal(Some(UNEXPECTED_MESSAGE), InvalidData, "a KeyUpdate record of 10 bytes (5 expected: one message, alone in its record)")
        );
        assert_eq!(
            decide(tls13, &mut left, Some(HANDSHAKE), &[KEY_UPDATE, 0, 0, 1]),
            fatal(Some(UNEXPECTED_MESSAGE), InvalidData, "a KeyUpdate record of 4 bytes (5 expected: one message, alone in its record)")
        );
        assert_eq!(
            decide(tls12, &mut left, Some(HANDSHAKE), &[KEY_UPDATE, 0, 0, 1, 0]),
            fatal(Some(UNEXPECTED_MESSAGE), InvalidData, "unexpected TLS record of type 22 after the handshake")
        );
        assert_eq!(
            decide(tls13, &mut left, Some(20), &[1]),
            fatal(Some(UNEXPECTED_MESSAGE), InvalidData, "unexpected TLS record of type 20 after the handshake")
        );
        // A record that does not authenticate gets bad_record_mac, one too long record_overflow.
        assert_eq!(alert_for_read_error(&io::Error::from_raw_os_error(libc::EBADMSG)), Some(BAD_RECORD_MAC));
        assert_eq!(alert_for_read_error(&io::Error::from_raw_os_error(libc::EMSGSIZE)), Some(RECORD_OVERFLOW));
        assert_eq!(alert_for_read_error(&io::Error::from_raw_os_error(libc::ECONNRESET)), None);
    }

    #[test]
    fn the_sending_key_closes_before_rustls_would_rekey_and_never_passes_its_limit() {
        let suite = |s: rustls::SupportedCipherSuite| suite_limits(&s, None);
        use rustls::crypto::ring::cipher_suite as cs;
        // rustls's confidentiality limits; the close is asked for 1/16 early.
        assert_eq!(suite(cs::TLS13_AES_128_GCM_SHA256), ((1 << 24) - (1 << 20), 1 << 24));
        assert_eq!(suite(cs::TLS13_AES_256_GCM_SHA384), ((1 << 24) - (1 << 20), 1 << 24));
        assert_eq!(suite(cs::TLS13_CHACHA20_POLY1305_SHA256), (u64::MAX - u64::MAX / 16, u64::MAX));
        // The test hook only ever brings the close earlier.
        assert_eq!(suite_limits(&cs::TLS13_AES_128_GCM_SHA256, Some(50)), (50, 1 << 24));
        assert_eq!(suite_limits(&cs::TLS13_AES_128_GCM_SHA256, Some(1 << 40)), ((1 << 24) - (1 << 20), 1 << 24));
        // Records a write may seal: one per started 16 KiB.
        assert_eq!([records_of(0), records_of(1), records_of(16384), records_of(16385), records_of(2 << 20)], [0, 1, 1, 2, 128]);
    }
}
