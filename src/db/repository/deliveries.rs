//! Webhook delivery ids seen within their signature's tolerance window
//! (`webhook_delivery_ids`), shared by every instance, so a signed delivery replayed to
//! another instance is refused there too.

use uuid::Uuid;

use super::GenericClient;
use crate::db::Error;

/// Expired rows a claim takes back besides its own, so the table stays as small as the
/// window's traffic without a sweeper.
const EXPIRED_PER_CLAIM: i64 = 100;

/// Claims delivery `id` of `datasource` until `expires_at` (Unix seconds): true when no
/// instance holds it unexpired, false for a replay.
///
/// # Errors
/// The statement failed.
pub async fn claim(
    client: &impl GenericClient,
    datasource: Uuid,
    id: &str,
    expires_at: i64,
) -> Result<bool, Error> {
    let claimed = client
        .query_opt(
            "WITH expired AS (
                 DELETE FROM webhook_delivery_ids
                  WHERE ctid IN (SELECT ctid FROM webhook_delivery_ids
                                  WHERE expires_at < now() LIMIT $4)
             )
             INSERT INTO webhook_delivery_ids AS d (datasource_id, delivery_id, expires_at)
             VALUES ($1, $2, to_timestamp($3::bigint))
             ON CONFLICT (datasource_id, delivery_id) DO UPDATE
                SET expires_at = EXCLUDED.expires_at
              WHERE d.expires_at < now()
             RETURNING 1",
            &[&datasource, &id, &expires_at, &EXPIRED_PER_CLAIM],
        )
        .await?;
    Ok(claimed.is_some())
}

/// Gives delivery `id` of `datasource` back (its delivery was not accepted), so its sender
/// may retry it.
///
/// # Errors
/// The statement failed.
pub async fn release(client: &impl GenericClient, datasource: Uuid, id: &str) -> Result<(), Error> {
    client
        .execute(
            "DELETE FROM webhook_delivery_ids WHERE datasource_id = $1 AND delivery_id = $2",
            &[&datasource, &id],
        )
        .await?;
    Ok(())
}
