//! A dedicated LISTEN connection: a client of its own (never from the pool, which would drop
//! notifications on recycle) whose driver forwards every notification to a channel.

use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client, NoTls, Notification};

use crate::db::Error;

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
    let config: tokio_postgres::Config = url
        .parse()
        .map_err(|e| Error::Invalid(format!("database URL: {e}")))?;
    listen_with(&config, channel).await
}

/// Connects with `config` and LISTENs on `channel`.
///
/// # Errors
/// [`Error::Unavailable`] when the server cannot be reached.
pub async fn listen_with(
    config: &tokio_postgres::Config,
    channel: &str,
) -> Result<Listening, Error> {
    let (client, mut connection) = config
        .connect(NoTls)
        .await
        .map_err(|e| Error::Unavailable(e.to_string()))?;
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
                    tracing::warn!(error = %e, "listening connection failed");
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
