//! Receiving NUL-terminated messages into locked memory.
//!
//! The socket's bytes land directly in a `SecretBuf`, because any call may
//! carry a passphrase: from the receive buffer onwards a secret never sits
//! in ordinary memory. The buffer starts at one page and grows (by an
//! explicit locked copy, the old one zeroized) only as far as the message
//! limit, so an idle connection costs one locked page.

use secrecy::{ExposeSecret, ExposeSecretMut};
use tokio::io::AsyncReadExt;
use tokio::net::UnixStream;

use crate::secret::{SecretBuf, SecretError};

const INITIAL: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum RecvError {
    #[error("message longer than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("connection closed in the middle of a message")]
    Truncated,
    #[error("reading from the client")]
    Io(#[source] std::io::Error),
    #[error("locked memory for the receive buffer")]
    Secret(#[from] SecretError),
}

/// A connection's receive side.
pub struct Receiver {
    buf: SecretBuf,
    filled: usize,
    /// Length of the message handed out last (with its NUL), consumed on the
    /// next call.
    handed_out: usize,
    limit: usize,
}

impl std::fmt::Debug for Receiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Receiver({} of {} bytes)", self.filled, self.limit)
    }
}

impl Receiver {
    pub fn new(limit: usize) -> Result<Self, RecvError> {
        Ok(Self {
            buf: SecretBuf::zeroed(INITIAL.min(limit.max(1)))?,
            filled: 0,
            handed_out: 0,
            limit,
        })
    }

    /// The next message, without its NUL; `None` on a clean end of stream.
    /// The bytes stay valid until the next call, which wipes them.
    pub async fn next(&mut self, stream: &mut UnixStream) -> Result<Option<&[u8]>, RecvError> {
        self.consume_previous();
        loop {
            if let Some(end) = self.buf.expose_secret()[..self.filled]
                .iter()
                .position(|&b| b == 0)
            {
                self.handed_out = end + 1;
                return Ok(Some(&self.buf.expose_secret()[..end]));
            }
            if self.filled == self.buf.len() {
                self.grow()?;
            }
            let spare = &mut self.buf.expose_secret_mut()[self.filled..];
            let n = stream.read(spare).await.map_err(RecvError::Io)?;
            if n == 0 {
                return if self.filled == 0 {
                    Ok(None)
                } else {
                    Err(RecvError::Truncated)
                };
            }
            self.filled += n;
        }
    }

    /// Drops the message handed out last and wipes where it was.
    fn consume_previous(&mut self) {
        if self.handed_out == 0 {
            return;
        }
        let bytes = self.buf.expose_secret_mut();
        bytes.copy_within(self.handed_out..self.filled, 0);
        let remaining = self.filled - self.handed_out;
        bytes[remaining..self.filled].fill(0);
        self.filled = remaining;
        self.handed_out = 0;
    }

    fn grow(&mut self) -> Result<(), RecvError> {
        if self.buf.len() >= self.limit {
            return Err(RecvError::TooLarge { limit: self.limit });
        }
        let size = (self.buf.len() * 2).min(self.limit);
        let mut bigger = SecretBuf::zeroed(size)?;
        bigger.expose_secret_mut()[..self.filled]
            .copy_from_slice(&self.buf.expose_secret()[..self.filled]);
        // The old buffer is zeroized as it drops.
        self.buf = bigger;
        Ok(())
    }
}

/// For the fuzzer: `stream` as one client's bytes, received over a real
/// socket pair by a [`Receiver`] with `limit`, calling `each` on every
/// message. The framing is checked against a plain split on NUL: a message
/// is handed out whole iff its NUL comes within `limit` bytes, the rest is
/// `TooLarge`, and a tail without NUL is `Truncated`.
pub(crate) fn fuzz_frames(limit: usize, stream: &[u8], mut each: impl FnMut(&[u8])) {
    use std::sync::OnceLock;
    use tokio::io::AsyncWriteExt;
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    let runtime = RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .expect("a tokio runtime")
    });
    let limit = limit.max(1);
    // The reader may stop before the writer is done; what is left unread
    // must fit in the socket's buffer, or the write would never finish.
    let stream = &stream[..stream.len().min(100 * 1024)];
    runtime.block_on(async {
        let (mut client, mut server) = UnixStream::pair().expect("a socket pair");
        let write = async move {
            // The reader stops early on TooLarge; a failed write is fine.
            let _ = client.write_all(stream).await;
        };
        let read = async {
            let mut rx = Receiver::new(limit).expect("locked memory");
            let mut offset = 0;
            loop {
                let rest = &stream[offset..];
                let nul = rest.iter().position(|&b| b == 0);
                match rx.next(&mut server).await {
                    Ok(Some(message)) => {
                        let end = nul.expect("a message without NUL");
                        assert!(end < limit, "message over the limit");
                        assert_eq!(message, &rest[..end]);
                        offset += end + 1;
                        each(message);
                    }
                    Ok(None) => {
                        assert!(rest.is_empty());
                        return;
                    }
                    Err(RecvError::TooLarge { .. }) => {
                        assert!(rest.len() >= limit && nul.is_none_or(|end| end >= limit));
                        return;
                    }
                    Err(RecvError::Truncated) => {
                        assert!(!rest.is_empty() && nul.is_none() && rest.len() < limit);
                        return;
                    }
                    Err(e) => panic!("receiving from a socket pair: {e}"),
                }
            }
        };
        tokio::join!(write, read);
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn messages_split_and_batched_arrive_whole() {
        let (mut client, mut server) = UnixStream::pair().unwrap();
        let mut rx = Receiver::new(64 * 1024).unwrap();
        client.write_all(b"{\"a\":1}\0{\"b\"").await.unwrap();
        assert_eq!(rx.next(&mut server).await.unwrap().unwrap(), b"{\"a\":1}");
        client.write_all(b":2}\0").await.unwrap();
        assert_eq!(rx.next(&mut server).await.unwrap().unwrap(), b"{\"b\":2}");
        drop(client);
        assert!(rx.next(&mut server).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_message_over_the_limit_is_refused() {
        let (mut client, mut server) = UnixStream::pair().unwrap();
        let mut rx = Receiver::new(10_000).unwrap();
        let writer = tokio::spawn(async move {
            let _ = client.write_all(&vec![b'x'; 20_000]).await;
        });
        assert!(matches!(
            rx.next(&mut server).await,
            Err(RecvError::TooLarge { limit: 10_000 })
        ));
        drop(server);
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn a_large_message_grows_the_buffer_and_consumed_bytes_are_wiped() {
        let (mut client, mut server) = UnixStream::pair().unwrap();
        let mut rx = Receiver::new(64 * 1024).unwrap();
        let mut big = vec![b'y'; 10_000];
        big.push(0);
        big.extend_from_slice(b"z\0");
        client.write_all(&big).await.unwrap();
        assert_eq!(rx.next(&mut server).await.unwrap().unwrap().len(), 10_000);
        assert_eq!(rx.next(&mut server).await.unwrap().unwrap(), b"z");
        rx.consume_previous();
        assert!(
            rx.buf.expose_secret().iter().all(|&b| b == 0),
            "old bytes left"
        );
    }

    #[tokio::test]
    async fn a_connection_closed_mid_message_is_truncated() {
        let (mut client, mut server) = UnixStream::pair().unwrap();
        let mut rx = Receiver::new(1024).unwrap();
        client.write_all(b"{\"half").await.unwrap();
        drop(client);
        assert!(matches!(
            rx.next(&mut server).await,
            Err(RecvError::Truncated)
        ));
    }
}
