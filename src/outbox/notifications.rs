//! A dedicated LISTEN connection: a client of its own (never from the pool, which would drop
//! notifications on recycle) whose driver forwards every notification to a channel.

use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client, Notification};

use crate::db::{Error, Target};

/// A connection listening on one channel, and the notifications it receives. The receiver
/// ends when the connection does.
pub struct Listening {
    /// The listening client; dropping it closes the connection.
    pub client: Client,
    /// Notifications in the order the server delivered them.
    pub notifications: mpsc::UnboundedReceiver<Notification>,
}

/// Connects to `url` and LISTENs on `channel`.
///
/// # Errors
/// [`Error::Invalid`] for a malformed URL, [`Error::Unavailable`] when the server cannot be
/// reached.
pub async fn listen(url: &str, channel: &str) -> Result<Listening, Error> {
    listen_with(&Target::parse(url)?, channel).await
}

/// Connects to `target` (TLS as its `sslmode` says, within its connect bound) and LISTENs on
/// `channel`.
///
/// # Errors
/// [`Error::Invalid`] for certificates that cannot be loaded, [`Error::Unavailable`] naming
/// the server and the cause when it cannot be reached, refuses the connection or does not
/// finish the startup in time.
pub async fn listen_with(target: &Target, channel: &str) -> Result<Listening, Error> {
    let (client, mut connection) = crate::db::handshake(target).await?;
    let (tx, notifications) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(n)) => {
                    if tx.send(n).is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %crate::db::cause(&e), "listening connection failed");
                    break;
                }
            }
        }
    });
    client
        .batch_execute(&format!("LISTEN {}", crate::db::quote_ident(channel)))
        .await?;
    Ok(Listening {
        client,
        notifications,
    })
}
