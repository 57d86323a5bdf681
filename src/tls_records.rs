//! The TLS 1.3 record layer of an established client connection, after rustls' handshake.
//!
//! Once a TLS 1.3 handshake is done, all a connection does is protect and check
//! application-data records (RFC 8446 section 5.2), answer the peer's `KeyUpdate`
//! (section 4.6.3) and say `close_notify`. rustls' connection object keeps ~2 KiB for
//! that (its state machine, the handshake's fragment table, its record layer) next to the
//! AEAD keys: most of what an idle TLS session costs. [`Records`] keeps the keys, the
//! nonces' static parts, the sequence numbers and rustls' key schedule (for key updates),
//! nothing else: it is what the kernel's kTLS does, in user space (this machine's kernel
//! has no `tls` module; where one is loaded, kTLS would be the next step).
//!
//! Sans-IO: [`Records::seal`] appends records to a buffer, [`Records::open`] decrypts one
//! record in place. rustls hands over through its kernel-connection API (the one meant
//! for kTLS): the keys and sequence numbers, and a [`KernelConnection`] that derives the
//! next keys when either side updates them.

use std::ops::Range;

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, NONCE_LEN};
use rustls::kernel::KernelConnection;
use rustls::server::ServerConnectionData;
use rustls::{ConnectionTrafficSecrets, ExtractedSecrets, SupportedCipherSuite};

/// Content types (RFC 8446 section 5.1).
const ALERT: u8 = 21;
pub(crate) const HANDSHAKE: u8 = 22;
pub(crate) const APPLICATION_DATA: u8 = 23;
/// Handshake type of `KeyUpdate`, and the length of the whole message (type, 3-byte
/// length, the request byte).
pub(crate) const KEY_UPDATE: u8 = 24;
const KEY_UPDATE_LEN: usize = 5;
/// Alert descriptions.
pub const CLOSE_NOTIFY: u8 = 0;
pub(crate) const UNEXPECTED_MESSAGE: u8 = 10;
pub(crate) const BAD_RECORD_MAC: u8 = 20;
const RECORD_OVERFLOW: u8 = 22;
pub(crate) const ILLEGAL_PARAMETER: u8 = 47;
pub(crate) const DECODE_ERROR: u8 = 50;
const USER_CANCELED: u8 = 90;

/// Largest plaintext in one record.
pub const MAX_PLAINTEXT: usize = 16384;
/// Largest encrypted payload of a record (plaintext, content type, padding, tag).
const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 256;
pub(crate) const HEADER: usize = 5;
const TAG: usize = 16;

/// Why a record was refused: the alert to send (if any) and what to say.
#[derive(Debug, thiserror::Error)]
#[error("TLS record: {what}")]
pub struct RecordError {
    /// The fatal alert owed to the peer; `None` when the peer sent one.
    pub alert: Option<u8>,
    /// What was wrong.
    pub what: &'static str,
}

fn refuse(alert: u8, what: &'static str) -> RecordError {
    RecordError {
        alert: Some(alert),
        what,
    }
}

/// What one record held.
#[derive(Debug, PartialEq, Eq)]
pub enum Opened {
    /// Application data, at this range of the input.
    Data(Range<usize>),
    /// The peer's `close_notify`.
    CloseNotify,
    /// Nothing for the reader (a key update, a `user_canceled` warning).
    Nothing,
}

/// One direction's keys and sequence number.
struct Direction {
    key: LessSafeKey,
    iv: [u8; NONCE_LEN],
    seq: u64,
}

impl Direction {
    /// The next record's nonce (RFC 8446 section 5.3), counting the record.
    fn next_nonce(&mut self) -> Result<Nonce, RecordError> {
        let seq = self.seq;
        self.seq = seq
            .checked_add(1)
            .ok_or(refuse(UNEXPECTED_MESSAGE, "sequence number exhausted"))?;
        let mut nonce = self.iv;
        for (n, s) in nonce[NONCE_LEN - 8..].iter_mut().zip(seq.to_be_bytes()) {
            *n ^= s;
        }
        Ok(Nonce::assume_unique_for_key(nonce))
    }

    /// Appends one record of `content_type` holding `data` to `out`.
    fn seal(
        &mut self,
        content_type: u8,
        data: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), RecordError> {
        let len = data.len() + 1 + TAG;
        let header = [APPLICATION_DATA, 3, 3, (len >> 8) as u8, len as u8];
        let nonce = self.next_nonce()?;
        let start = out.len();
        out.extend_from_slice(&header);
        out.extend_from_slice(data);
        out.push(content_type);
        let body = &mut out[start + HEADER..];
        match self
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(header), body)
        {
            Ok(tag) => {
                out.extend_from_slice(tag.as_ref());
                Ok(())
            }
            Err(_) => {
                out.truncate(start);
                Err(refuse(UNEXPECTED_MESSAGE, "encryption failed"))
            }
        }
    }

    /// Decrypts a record's `body` in place: its plaintext (content, type, padding).
    fn open<'a>(
        &mut self,
        header: [u8; HEADER],
        body: &'a mut [u8],
    ) -> Result<&'a mut [u8], RecordError> {
        let nonce = self.next_nonce()?;
        self.key
            .open_in_place(nonce, Aad::from(header), body)
            .map_err(|_| refuse(BAD_RECORD_MAC, "record does not authenticate"))
    }
}

/// Builds one direction from rustls' secrets.
fn direction(secrets: ConnectionTrafficSecrets, seq: u64) -> Option<Direction> {
    let (aead, key, iv) = match &secrets {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
        ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
        ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
            (&aead::CHACHA20_POLY1305, key, iv)
        }
        _ => return None,
    };
    Some(Direction {
        key: LessSafeKey::new(UnboundKey::new(aead, key.as_ref()).ok()?),
        iv: iv.as_ref().try_into().ok()?,
        seq,
    })
}

/// One direction's keys after a key update.
fn rekeyed(
    update: Result<(u64, ConnectionTrafficSecrets), rustls::Error>,
) -> Result<Direction, RecordError> {
    let failed = || refuse(UNEXPECTED_MESSAGE, "key update failed");
    let (seq, secrets) = update.map_err(|_| failed())?;
    direction(secrets, seq).ok_or_else(failed)
}

/// The record layer of one TLS 1.3 connection, the server's side.
pub struct Records {
    /// What rustls keeps to derive the next keys.
    kernel: KernelConnection<ServerConnectionData>,
    tx: Direction,
    rx: Direction,
    /// Records one key may protect before we update it (the suite's confidentiality
    /// limit, less a margin).
    limit: u64,
    /// The peer asked for our key update: it goes before our next record.
    update_owed: bool,
    /// The start of a `KeyUpdate` whose rest is in the peer's next record.
    partial: [u8; KEY_UPDATE_LEN - 1],
    partial_len: u8,
}

impl Records {
    /// Takes over from rustls (`dangerous_into_kernel_connection`); `None` when the
    /// connection is not TLS 1.3 with a suite this layer knows.
    pub fn new(
        extracted: ExtractedSecrets,
        kernel: KernelConnection<ServerConnectionData>,
    ) -> Option<Records> {
        let SupportedCipherSuite::Tls13(suite) = kernel.negotiated_cipher_suite() else {
            return None;
        };
        let limit = suite.common.confidentiality_limit.saturating_sub(1024);
        let ExtractedSecrets {
            tx: (tx_seq, tx),
            rx: (rx_seq, rx),
        } = extracted;
        Some(Records {
            tx: direction(tx, tx_seq)?,
            rx: direction(rx, rx_seq)?,
            kernel,
            limit,
            update_owed: false,
            partial: [0; KEY_UPDATE_LEN - 1],
            partial_len: 0,
        })
    }

    /// Appends `data` to `out` as application-data records (a key update first when one
    /// is owed or the key has protected its share).
    pub fn seal(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<(), RecordError> {
        for chunk in data.chunks(MAX_PLAINTEXT) {
            self.seal_record(APPLICATION_DATA, chunk, out)?;
        }
        Ok(())
    }

    /// Appends an alert record (`close_notify`, or a fatal alert) to `out`.
    pub fn seal_alert(&mut self, description: u8, out: &mut Vec<u8>) -> Result<(), RecordError> {
        let level = if description == CLOSE_NOTIFY { 1 } else { 2 };
        self.seal_record(ALERT, &[level, description], out)
    }

    /// Asks the peer for a key update with ours (used by tests; our own key updates at the
    /// confidentiality limit do not ask).
    #[cfg(test)]
    pub fn request_key_update(&mut self, out: &mut Vec<u8>) -> Result<(), RecordError> {
        self.seal_record(HANDSHAKE, &[KEY_UPDATE, 0, 0, 1, 1], out)?;
        self.tx = self.next_tx()?;
        Ok(())
    }

    /// Our next keys (rustls' key schedule derives them).
    fn next_tx(&mut self) -> Result<Direction, RecordError> {
        rekeyed(self.kernel.update_tx_secret())
    }

    /// The peer's next keys.
    fn next_rx(&mut self) -> Result<Direction, RecordError> {
        rekeyed(self.kernel.update_rx_secret())
    }

    fn seal_record(
        &mut self,
        content_type: u8,
        data: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), RecordError> {
        if content_type == APPLICATION_DATA && (self.update_owed || self.tx.seq >= self.limit) {
            self.update_owed = false;
            self.tx.seal(HANDSHAKE, &[KEY_UPDATE, 0, 0, 1, 0], out)?;
            self.tx = self.next_tx()?;
        }
        self.tx.seal(content_type, data, out)
    }

    /// Opens the record at the front of `input` in place. `None`: no complete record yet;
    /// else what it held and its length on the wire.
    pub fn open(&mut self, input: &mut [u8]) -> Result<Option<(Opened, usize)>, RecordError> {
        let Some(header) = input.get(..HEADER) else {
            return Ok(None);
        };
        let header: [u8; HEADER] = [header[0], header[1], header[2], header[3], header[4]];
        // After the handshake every record is protected (section 5): a plaintext alert or
        // a change_cipher_spec is out of place.
        if header[0] != APPLICATION_DATA {
            return Err(refuse(
                UNEXPECTED_MESSAGE,
                "unprotected record after the handshake",
            ));
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len > MAX_CIPHERTEXT {
            return Err(refuse(RECORD_OVERFLOW, "record too long"));
        }
        let Some(body) = input.get_mut(HEADER..HEADER + len) else {
            return Ok(None);
        };
        let plain = self.rx.open(header, body)?;
        // The content type is the last non-zero byte; zeros after it are padding.
        let Some(end) = plain.iter().rposition(|&b| b != 0) else {
            return Err(refuse(UNEXPECTED_MESSAGE, "record without a content type"));
        };
        if end > MAX_PLAINTEXT {
            return Err(refuse(RECORD_OVERFLOW, "record plaintext too long"));
        }
        let wire = HEADER + len;
        if self.partial_len > 0 && plain[end] != HANDSHAKE {
            return Err(refuse(
                UNEXPECTED_MESSAGE,
                "a handshake message interrupted by another record",
            ));
        }
        let opened = match plain[end] {
            APPLICATION_DATA => Opened::Data(HEADER..HEADER + end),
            ALERT => match &plain[..end] {
                [_, CLOSE_NOTIFY] => Opened::CloseNotify,
                [_, USER_CANCELED] => Opened::Nothing,
                [_, _] => {
                    return Err(RecordError {
                        alert: None,
                        what: "the client sent a fatal alert",
                    })
                }
                _ => return Err(refuse(DECODE_ERROR, "malformed alert")),
            },
            HANDSHAKE => self.handshake(&plain[..end])?,
            _ => return Err(refuse(UNEXPECTED_MESSAGE, "unknown content type")),
        };
        Ok(Some((opened, wire)))
    }

    /// Takes one record's handshake bytes. Only a `KeyUpdate` may follow the handshake
    /// here (no post-handshake authentication is asked for). Section 5.1 lets a handshake
    /// message span records as long as nothing comes between its pieces, and makes a
    /// `KeyUpdate` end its record (the key changes after it): so one may arrive in pieces,
    /// kept in `partial` until it is whole, but nothing may follow it in its record.
    fn handshake(&mut self, bytes: &[u8]) -> Result<Opened, RecordError> {
        if bytes.is_empty() {
            return Err(refuse(UNEXPECTED_MESSAGE, "empty handshake record"));
        }
        let had = usize::from(self.partial_len);
        let total = had + bytes.len();
        let kind = if had > 0 { self.partial[0] } else { bytes[0] };
        if kind != KEY_UPDATE || total > KEY_UPDATE_LEN {
            return Err(refuse(
                UNEXPECTED_MESSAGE,
                "handshake message after the handshake",
            ));
        }
        let mut msg = [0u8; KEY_UPDATE_LEN];
        msg[..had].copy_from_slice(&self.partial[..had]);
        msg[had..total].copy_from_slice(bytes);
        // Its length: one byte of body.
        let length_seen = total.min(4);
        if msg[1..length_seen] != [0, 0, 1][..length_seen - 1] {
            return Err(refuse(DECODE_ERROR, "key update of the wrong length"));
        }
        if total < KEY_UPDATE_LEN {
            self.partial[..total].copy_from_slice(&msg[..total]);
            self.partial_len = total as u8;
            return Ok(Opened::Nothing);
        }
        self.partial_len = 0;
        match msg[4] {
            request @ (0 | 1) => {
                self.rx = self.next_rx()?;
                self.update_owed |= request == 1;
                Ok(Opened::Nothing)
            }
            _ => Err(refuse(ILLEGAL_PARAMETER, "bad key update request")),
        }
    }
}

/// Lets connections made with `config` hand their TLS 1.3 records to [`Records`].
pub fn enable(config: &mut rustls::ServerConfig) {
    config.enable_secret_extraction = true;
}

/// The client's end of a connection's records, for tests: seals records with the client's
/// keys and opens the server's, from the secrets a rustls client gives up.
#[cfg(test)]
pub(crate) struct Peer {
    tx: Direction,
    rx: Direction,
}

#[cfg(test)]
impl Peer {
    pub(crate) fn new(secrets: ExtractedSecrets) -> Peer {
        let ExtractedSecrets {
            tx: (tx_seq, tx),
            rx: (rx_seq, rx),
        } = secrets;
        Peer {
            tx: direction(tx, tx_seq).expect("a known suite"),
            rx: direction(rx, rx_seq).expect("a known suite"),
        }
    }

    /// One record of `content_type` holding `data`, under the client's key.
    pub(crate) fn record(&mut self, content_type: u8, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        self.tx.seal(content_type, data, &mut out).expect("seal");
        out
    }

    /// Opens the server's record at the front of `wire`: its content type, its content,
    /// and its length on the wire.
    pub(crate) fn open(&mut self, wire: &mut [u8]) -> (u8, Vec<u8>, usize) {
        let len = usize::from(u16::from_be_bytes([wire[3], wire[4]]));
        let header: [u8; HEADER] = wire[..HEADER].try_into().expect("a header");
        let plain = self
            .rx
            .open(header, &mut wire[HEADER..HEADER + len])
            .expect("the server's record opens");
        let end = plain.iter().rposition(|&b| b != 0).expect("a content type");
        (plain[end], plain[..end].to_vec(), HEADER + len)
    }
}
