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
const HANDSHAKE: u8 = 22;
const APPLICATION_DATA: u8 = 23;
/// Handshake type of `KeyUpdate`.
const KEY_UPDATE: u8 = 24;
/// Alert descriptions.
pub const CLOSE_NOTIFY: u8 = 0;
const UNEXPECTED_MESSAGE: u8 = 10;
const BAD_RECORD_MAC: u8 = 20;
const RECORD_OVERFLOW: u8 = 22;
const ILLEGAL_PARAMETER: u8 = 47;
const DECODE_ERROR: u8 = 50;
const USER_CANCELED: u8 = 90;

/// Largest plaintext in one record.
pub const MAX_PLAINTEXT: usize = 16384;
/// Largest encrypted payload of a record (plaintext, content type, padding, tag).
const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 256;
const HEADER: usize = 5;
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
            self.seal_one(HANDSHAKE, &[KEY_UPDATE, 0, 0, 1, 0], out)?;
            self.tx = self.next_tx()?;
        }
        self.seal_one(content_type, data, out)
    }

    fn seal_one(
        &mut self,
        content_type: u8,
        data: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), RecordError> {
        let len = data.len() + 1 + TAG;
        let header = [APPLICATION_DATA, 3, 3, (len >> 8) as u8, len as u8];
        let nonce = self.tx.next_nonce()?;
        let start = out.len();
        out.extend_from_slice(&header);
        out.extend_from_slice(data);
        out.push(content_type);
        let body = &mut out[start + HEADER..];
        match self
            .tx
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
        let nonce = self.rx.next_nonce()?;
        let plain = self
            .rx
            .key
            .open_in_place(nonce, Aad::from(header), body)
            .map_err(|_| refuse(BAD_RECORD_MAC, "record does not authenticate"))?;
        // The content type is the last non-zero byte; zeros after it are padding.
        let Some(end) = plain.iter().rposition(|&b| b != 0) else {
            return Err(refuse(UNEXPECTED_MESSAGE, "record without a content type"));
        };
        if end > MAX_PLAINTEXT {
            return Err(refuse(RECORD_OVERFLOW, "record plaintext too long"));
        }
        let wire = HEADER + len;
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
            HANDSHAKE => {
                // Only a KeyUpdate may follow the handshake here (no post-handshake
                // authentication is asked for), and it ends its record (section 5.1).
                match &plain[..end] {
                    [KEY_UPDATE, 0, 0, 1, request @ (0 | 1)] => {
                        let request = *request == 1;
                        self.rx = self.next_rx()?;
                        self.update_owed |= request;
                        Opened::Nothing
                    }
                    [KEY_UPDATE, 0, 0, 1, _] => {
                        return Err(refuse(ILLEGAL_PARAMETER, "bad key update request"))
                    }
                    _ => {
                        return Err(refuse(
                            UNEXPECTED_MESSAGE,
                            "handshake message after the handshake",
                        ))
                    }
                }
            }
            _ => return Err(refuse(UNEXPECTED_MESSAGE, "unknown content type")),
        };
        Ok(Some((opened, wire)))
    }
}

/// Lets connections made with `config` hand their TLS 1.3 records to [`Records`].
pub fn enable(config: &mut rustls::ServerConfig) {
    config.enable_secret_extraction = true;
}
