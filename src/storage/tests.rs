//! Storage conformance tests, run on SQLite always and on PostgreSQL when
//! `TEST_POSTGRES_URL` is set (see tests/common).

use super::Store;

async fn sqlite_store() -> (Store, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("t.db").display());
    (Store::open(&url, 2).await.unwrap(), dir)
}

#[tokio::test]
async fn duplicate_user_is_user_in_use() {
    let (store, _dir) = sqlite_store().await;
    let new = || super::NewUser {
        user_id: "@a:x",
        password_hash: None,
        is_admin: false,
        displayname: Some("a"),
        created_ts: 1,
        session: None,
        registration_token: None,
        uiaa_session: None,
    };
    store.create_user(new()).await.unwrap();
    assert_eq!(store.create_user(new()).await.unwrap_err().errcode(), "M_USER_IN_USE");
    assert!(store.user_exists("@a:x").await.unwrap());
}
