//! Every migration can be reverted and applied again.

use dsreg::db::{self, migrations};

use crate::helpers::TestDb;

#[tokio::test]
async fn migrations_go_up_down_and_up_again() {
    let test_db = TestDb::new().await;
    let mut client = db::connect(&test_db.url).await.unwrap();
    let latest = migrations::latest_known();
    let known = migrations::known_versions();
    assert_eq!(migrations::current_version(&client).await.unwrap(), latest);

    let reverted = migrations::migrate_down(&mut client, 0).await.unwrap();
    assert_eq!(reverted.len(), known.len());
    assert_eq!(migrations::current_version(&client).await.unwrap(), 0);
    let leftovers: i64 = client
        .query_one(
            "SELECT (SELECT count(*) FROM pg_tables WHERE schemaname = 'public' AND tablename <> 'refinery_schema_history')
                  + (SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                     WHERE n.nspname = 'public' AND p.proname LIKE 'dsreg%')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        leftovers, 0,
        "the reverse scripts leave no table or function behind"
    );

    let applied = migrations::migrate_up(&mut client).await.unwrap();
    assert_eq!(applied, known);
    client
        .execute("INSERT INTO datasources (org, project, name, kind) VALUES ('a', 'b', 'c', 'generator')", &[])
        .await
        .unwrap();
    let events: i64 = client
        .query_one(
            "SELECT count(*) FROM datasource_events WHERE type = 'created'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(events, 1, "the triggers are back after up");
}
