//! The identity client against the real emulator over real sockets: every operation, every
//! documented error answer with no body, a JSON body and an HTML body, and every error class
//! (the table of docs/identity-service.md section 5).

use std::time::Duration;

use tokenbroker::config::IdentityConfig;
use tokenbroker::emulator::{BodyStyle, Emulator, EmulatorConfig, Fault, FaultKind, Operation};
use tokenbroker::identity::{CreateRequest, ErrorClass, IdentityClient, IdentityError};
use tokenbroker::secret::Secret;

const SECRET: &str = "identity-test-client-secret";

async fn emulator(seconds_per_minute: f64) -> Emulator {
    Emulator::start(EmulatorConfig {
        clients: vec![("admin".into(), Secret::new(SECRET))],
        seconds_per_minute,
        ..EmulatorConfig::default()
    })
    .await
    .expect("emulator starts")
}

fn client_for(base_url: String, request_timeout: Duration) -> IdentityClient {
    IdentityClient::new(&IdentityConfig {
        base_url,
        tenant: "CUSTOMER".into(),
        client_id: "admin".into(),
        client_secret: Secret::new(SECRET),
        scope: None,
        ca_file: None,
        connect_timeout: Duration::from_secs(2),
        request_timeout,
    })
    .expect("client builds")
}

fn client(emu: &Emulator) -> IdentityClient {
    IdentityClient::new(&emu.identity_config("admin", &Secret::new(SECRET))).expect("client builds")
}

fn create_request(name: &str) -> CreateRequest {
    CreateRequest {
        display_name: name.into(),
        api_token_ttl_minutes: 60,
        access_token_ttl_minutes: 30,
        max_count_of_uses: None,
        description: Some("identity client test".into()),
        client_id: None,
    }
}

async fn admin(c: &IdentityClient) -> Secret {
    c.client_credentials("admin", &Secret::new(SECRET), Some("admin"))
        .await
        .expect("admin bearer")
        .token
}

#[tokio::test]
async fn full_protocol_round_trip() {
    let emu = emulator(60.0).await;
    let c = client(&emu);
    let bearer = c
        .client_credentials("admin", &Secret::new(SECRET), Some("admin"))
        .await
        .unwrap();
    assert_eq!(bearer.token_type, "Bearer");
    assert!(bearer.lifetime.unwrap() > Duration::from_secs(60));

    let api = c
        .create_api_token(&bearer.token, &create_request("client-test"))
        .await
        .unwrap();
    assert!(api.token.expose().starts_with("vidb_"));
    assert_eq!(api.suffix, api.token.suffix(5));
    assert_eq!(api.display_name.as_deref(), Some("client-test"));
    // 60 emulated minutes at 60 s each, measured from the server's own dates
    let life = api.lifetime.as_secs();
    assert!((3595..=3600).contains(&life), "{life}");

    let access = c.exchange(&api.token).await.unwrap();
    let life = access.lifetime.unwrap().as_secs();
    assert!((1795..=1800).contains(&life), "{life}");

    let regenerated = c
        .regenerate_api_token(&bearer.token, &api.token, 60)
        .await
        .unwrap();
    assert_eq!(regenerated.id, api.id, "regenerate keeps the id");
    assert_ne!(regenerated.token.expose(), api.token.expose());
    c.exchange(&regenerated.token).await.unwrap();

    let counters = emu.counters();
    assert_eq!(
        (
            counters.client_credentials,
            counters.create,
            counters.regenerate,
            counters.exchange
        ),
        (1, 1, 1, 2)
    );
}

#[tokio::test]
async fn regenerate_kills_the_old_secret_at_once() {
    let emu = emulator(60.0).await;
    let c = client(&emu);
    let bearer = admin(&c).await;
    let api = c
        .create_api_token(&bearer, &create_request("old-secret"))
        .await
        .unwrap();
    c.regenerate_api_token(&bearer, &api.token, 60)
        .await
        .unwrap();

    let exchange = c.exchange(&api.token).await.unwrap_err();
    assert_eq!(
        exchange.class(),
        ErrorClass::InvalidCredential,
        "{exchange}"
    );
    let again = c
        .regenerate_api_token(&bearer, &api.token, 60)
        .await
        .unwrap_err();
    assert_eq!(again.class(), ErrorClass::InvalidCredential, "{again}");
    assert_no_body(&again, Operation::Regenerate, 400);
}

/// The error is the status of `op` with nothing from a body (the emulator sent none).
fn assert_no_body(e: &IdentityError, op: Operation, status: u16) {
    match e {
        IdentityError::Status {
            op: o,
            status: s,
            error: None,
            description: None,
            ..
        } => assert_eq!((*o, *s), (op, status), "{e}"),
        other => panic!("expected a bodyless {status} from {op}, got {other:?}"),
    }
}

#[tokio::test]
async fn regenerating_a_revoked_token_is_a_bodyless_invalid_credential() {
    let emu = emulator(60.0).await;
    let c = client(&emu);
    let bearer = admin(&c).await;
    let api = c
        .create_api_token(&bearer, &create_request("revoked"))
        .await
        .unwrap();
    assert!(emu.revoke_api_token(&api.id));
    let e = c
        .regenerate_api_token(&bearer, &api.token, 60)
        .await
        .unwrap_err();
    assert_eq!(e.class(), ErrorClass::InvalidCredential, "{e}");
    assert_no_body(&e, Operation::Regenerate, 400);
    assert!(e.to_string().starts_with("regenerate: "), "{e}");
}

#[tokio::test]
async fn single_use_token_is_refused_on_its_second_exchange() {
    let emu = emulator(60.0).await;
    let c = client(&emu);
    let bearer = admin(&c).await;
    let mut req = create_request("single-use");
    req.max_count_of_uses = Some(1);
    let api = c.create_api_token(&bearer, &req).await.unwrap();
    c.exchange(&api.token).await.expect("first exchange");
    let second = c.exchange(&api.token).await.unwrap_err();
    assert_eq!(second.class(), ErrorClass::InvalidCredential);
    match second {
        IdentityError::Status { status, error, .. } => {
            assert_eq!(status, 400);
            assert_eq!(error.as_deref(), Some("invalid_grant"));
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn wrong_client_secret_is_refused_and_a_stale_bearer_unauthorized() {
    let emu = emulator(60.0).await;
    let c = client(&emu);
    let e = c
        .client_credentials("admin", &Secret::new("wrong"), None)
        .await
        .unwrap_err();
    assert_eq!(e.class(), ErrorClass::Refused, "{e}");
    assert!(
        matches!(&e, IdentityError::Status { error: Some(code), .. } if code == "invalid_client")
    );
    assert!(!e.to_string().contains("wrong"));

    let stale = Secret::new("not-a-bearer");
    let e = c
        .create_api_token(&stale, &create_request("abc"))
        .await
        .unwrap_err();
    assert_eq!(e.class(), ErrorClass::Unauthorized, "{e}");
    assert_no_body(&e, Operation::Create, 401);

    let api = c
        .create_api_token(&admin(&c).await, &create_request("stale-bearer"))
        .await
        .unwrap();
    let e = c
        .regenerate_api_token(&stale, &api.token, 60)
        .await
        .unwrap_err();
    assert_eq!(e.class(), ErrorClass::Unauthorized, "{e}");
    assert_no_body(&e, Operation::Regenerate, 401);
}

#[tokio::test]
async fn invalid_create_requests_are_refused_with_the_reason() {
    let emu = emulator(60.0).await;
    let c = client(&emu);
    let bearer = admin(&c).await;
    let e = c
        .create_api_token(&bearer, &create_request("ab"))
        .await
        .unwrap_err();
    assert_eq!(e.class(), ErrorClass::Refused, "{e}");
    assert!(e.to_string().contains("token_display_name"), "{e}");
    let mut req = create_request("fine-name");
    req.max_count_of_uses = Some(5);
    let e = c.create_api_token(&bearer, &req).await.unwrap_err();
    assert!(e.to_string().contains("max_count_of_uses"), "{e}");
}

#[tokio::test(start_paused = true)]
async fn expired_api_token_is_an_invalid_credential() {
    // 0.05 s per minute: a 20-minute API token lives one second
    let emu = emulator(0.05).await;
    let c = client(&emu);
    let bearer = admin(&c).await;
    let mut req = create_request("short-lived");
    req.api_token_ttl_minutes = 20;
    let api = c.create_api_token(&bearer, &req).await.unwrap();
    assert!(api.lifetime <= Duration::from_secs(1));
    tokio::time::advance(Duration::from_millis(1300)).await;
    let e = c.exchange(&api.token).await.unwrap_err();
    assert_eq!(e.class(), ErrorClass::InvalidCredential, "{e}");
}

fn fault(kind: FaultKind, op: Operation) -> Fault {
    Fault::new(kind, vec![op], Some(1))
}

#[tokio::test]
async fn transient_failures_are_classified_and_carry_retry_after() {
    let emu = emulator(60.0).await;
    let c = client_for(emu.base_url(), Duration::from_millis(500));
    let bearer = admin(&c).await;
    let api = c
        .create_api_token(&bearer, &create_request("faults"))
        .await
        .unwrap();

    emu.inject_fault(fault(FaultKind::ServerError, Operation::Exchange));
    let e = c.exchange(&api.token).await.unwrap_err();
    assert_eq!(e.class(), ErrorClass::Transient, "{e}");
    assert!(e.to_string().contains("500"));

    emu.inject_fault(fault(
        FaultKind::TooManyRequests {
            retry_after_secs: 7,
        },
        Operation::Exchange,
    ));
    let e = c.exchange(&api.token).await.unwrap_err();
    assert_eq!(e.class(), ErrorClass::Transient);
    assert_eq!(e.retry_after(), Some(Duration::from_secs(7)));

    emu.inject_fault(fault(FaultKind::Garbage, Operation::Exchange));
    let e = c.exchange(&api.token).await.unwrap_err();
    assert!(matches!(e, IdentityError::BadBody { .. }), "{e:?}");
    assert_eq!(e.class(), ErrorClass::Transient);

    emu.inject_fault(fault(
        FaultKind::Slow { delay_ms: 2000 },
        Operation::Exchange,
    ));
    let e = c.exchange(&api.token).await.unwrap_err();
    assert!(matches!(e, IdentityError::Timeout(_)), "{e:?}");

    emu.inject_fault(Fault {
        kind: FaultKind::Refuse,
        operations: vec![],
        requests: None,
        seconds: None,
    });
    let e = c.exchange(&api.token).await.unwrap_err();
    assert!(matches!(e, IdentityError::Connect(_)), "{e:?}");
    assert_eq!(e.class(), ErrorClass::Transient);
    emu.clear_faults();

    // after all of that, the same client works again
    c.exchange(&api.token).await.expect("recovered");
}

#[tokio::test]
async fn nothing_listening_is_a_connect_error() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let c = client_for(format!("http://{addr}"), Duration::from_secs(2));
    let e = c.exchange(&Secret::new("vidb_x")).await.unwrap_err();
    assert!(matches!(e, IdentityError::Connect(_)), "{e:?}");
}

/// Calls `op` and keeps only the error.
async fn call(
    c: &IdentityClient,
    op: Operation,
    bearer: &Secret,
    api_token: &Secret,
) -> Result<(), IdentityError> {
    match op {
        Operation::ClientCredentials => c
            .client_credentials("admin", &Secret::new(SECRET), Some("admin"))
            .await
            .map(drop),
        Operation::Exchange => c.exchange(api_token).await.map(drop),
        Operation::Create => c
            .create_api_token(bearer, &create_request("by-the-table"))
            .await
            .map(drop),
        Operation::Regenerate => c
            .regenerate_api_token(bearer, api_token, 60)
            .await
            .map(drop),
    }
}

#[tokio::test]
async fn every_error_answer_of_every_operation_is_classed_by_the_table() {
    use ErrorClass::*;
    use Operation::*;
    let emu = emulator(60.0).await;
    let c = client(&emu);
    let bearer = admin(&c).await;
    let api = c
        .create_api_token(&bearer, &create_request("by-the-table"))
        .await
        .unwrap()
        .token;

    // The documented error answers: (operation, status, the JSON body's error code, class with
    // that JSON body, class with no body or an HTML body).
    let documented = [
        (ClientCredentials, 400, "invalid_request", Refused, Refused),
        (ClientCredentials, 400, "invalid_scope", Refused, Refused),
        (
            ClientCredentials,
            400,
            "unsupported_grant_type",
            Refused,
            Refused,
        ),
        (ClientCredentials, 401, "invalid_client", Refused, Refused),
        (Exchange, 400, "invalid_grant", InvalidCredential, Refused),
        (Exchange, 400, "invalid_request", Refused, Refused),
        (Exchange, 400, "unsupported_grant_type", Refused, Refused),
        (Exchange, 401, "invalid_client", Refused, Refused),
        (Create, 400, "invalid_request", Refused, Refused),
        (Create, 401, "invalid_token", Unauthorized, Unauthorized),
        (
            Regenerate,
            400,
            "invalid_request",
            InvalidCredential,
            InvalidCredential,
        ),
        (
            Regenerate,
            400,
            "invalid_grant",
            InvalidCredential,
            InvalidCredential,
        ),
        (Regenerate, 401, "invalid_token", Unauthorized, Unauthorized),
    ];
    let mut cases = Vec::new();
    for (op, status, code, with_json, otherwise) in documented {
        cases.push((op, status, BodyStyle::Json, Some(code), with_json));
        cases.push((op, status, BodyStyle::Empty, None, otherwise));
        cases.push((op, status, BodyStyle::Html, None, otherwise));
    }
    // Statuses any operation may meet, whatever the body.
    for op in Operation::ALL {
        for (status, class) in [
            (403, Refused),
            (404, Refused),
            (405, Refused),
            (415, Refused),
            (408, Transient),
            (429, Transient),
            (500, Transient),
            (502, Transient),
            (503, Transient),
            (504, Transient),
        ] {
            for body in [BodyStyle::Empty, BodyStyle::Json, BodyStyle::Html] {
                cases.push((op, status, body, None, class));
            }
        }
    }

    for &(op, status, body, error, class) in &cases {
        let retry_after = matches!(status, 429 | 503).then_some(4);
        emu.try_inject_fault(Fault::new(
            FaultKind::Status {
                status,
                body,
                error: error.map(str::to_string),
                retry_after,
            },
            vec![op],
            Some(1),
        ))
        .unwrap();
        let e = call(&c, op, &bearer, &api).await.unwrap_err();
        let what = format!("{op} {status} {body:?} {error:?}: {e}");
        assert_eq!(e.class(), class, "{what}");
        assert_eq!(e.op(), Some(op), "{what}");
        assert_eq!(
            e.retry_after(),
            retry_after.map(Duration::from_secs),
            "{what}"
        );
        match (&e, body) {
            (IdentityError::Status { error: got, .. }, BodyStyle::Json) if error.is_some() => {
                assert_eq!(got.as_deref(), error, "{what}")
            }
            (
                IdentityError::Status {
                    error: None,
                    description: None,
                    ..
                },
                BodyStyle::Empty | BodyStyle::Html,
            ) => {}
            (IdentityError::Status { .. }, BodyStyle::Json) => {}
            _ => panic!("unexpected error shape: {what}"),
        }
        let text = e.to_string();
        assert!(text.starts_with(&format!("{op}: ")), "{what}");
        assert!(
            !text.contains(api.expose()) && !text.contains(bearer.expose()),
            "{what}"
        );
        assert!(emu.active_faults().is_empty(), "the fault was hit: {what}");
    }

    // A success status whose body is unusable is transient for every operation.
    for op in Operation::ALL {
        emu.inject_fault(fault(FaultKind::Garbage, op));
        let e = call(&c, op, &bearer, &api).await.unwrap_err();
        assert!(matches!(e, IdentityError::BadBody { .. }), "{op}: {e:?}");
        assert_eq!(e.class(), Transient, "{op}");
    }
    // And the credentials still work: nothing above was answered by the emulator itself.
    for op in Operation::ALL {
        call(&c, op, &bearer, &api).await.expect("served normally");
    }
}
