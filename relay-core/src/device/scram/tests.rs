//! SCRAM tests: the RFC 7677 §3 exchange byte for byte, failures, and malformed input.

use base64::Engine as _;
use proptest::prelude::*;
use rand::SeedableRng;

use super::*;

const NONCE: &str = "rOprNGfwEbeRWgbNEkqO";
const SERVER_NONCE: &str = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
const SALT: &str = "W22ZaJ0SNY7soEsUEjb6gQ==";

fn ok<T, E: std::fmt::Display>(r: Result<T, E>) -> T {
    r.unwrap_or_else(|e| panic!("{e}"))
}

fn pencil() -> ScramVerifier {
    ok(ScramVerifier::new("pencil", &ok(B64.decode(SALT)), 4096))
}

#[test]
fn rfc7677_example() {
    let mut client = ok(ScramClient::new("user", "pencil", NONCE));
    let client_first = client.client_first();
    assert_eq!(client_first, "n,,n=user,r=rOprNGfwEbeRWgbNEkqO");
    assert_eq!(ok(client_first_username(&client_first)), "user");

    let mut server = ScramServer::new(pencil());
    let server_first = ok(server.handle_client_first(&client_first, SERVER_NONCE));
    assert_eq!(
        server_first,
        "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
    );

    let client_final = ok(client.handle_server_first(&server_first));
    assert_eq!(
        client_final,
        "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
         p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
    );

    let server_final = ok(server.handle_client_final(&client_final));
    assert_eq!(
        server_final,
        "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
    );
    assert_eq!(client.handle_server_final(&server_final), Ok(()));

    // Each side is finished.
    assert_eq!(
        client.handle_server_final(&server_final),
        Err(ScramError::OutOfOrder)
    );
    assert_eq!(
        server.handle_client_final(&client_final),
        Err(ScramError::OutOfOrder)
    );
}

#[test]
fn verifier_text_round_trips_without_the_password() {
    let v = pencil();
    let text = v.to_string();
    assert!(
        text.starts_with("SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$"),
        "{text}"
    );
    assert!(!text.contains("pencil"));
    assert_eq!(ok(text.parse::<ScramVerifier>()), v);
    let debug = format!("{v:?}");
    assert!(
        !debug.contains("pencil") && !debug.contains(&B64.encode(v.stored_key())),
        "{debug}"
    );
}

#[test]
fn bad_verifiers_are_refused() {
    let good = pencil().to_string();
    let (head, keys) = good.rsplit_once('$').unwrap_or_else(|| panic!("{good}"));
    let cases = [
        String::new(),
        "SCRAM-SHA-1$4096:W22ZaJ0SNY7soEsUEjb6gQ==$a:b".to_owned(),
        good.replace("4096", "1000"),
        good.replace("4096", "lots"),
        good.replacen(":W22", ":", 1)
            .replace("ZaJ0SNY7soEsUEjb6gQ==", ""),
        format!("{head}$AAAA:{}", keys.split_once(':').map_or("", |k| k.1)),
        format!("{head}${keys}$extra"),
        format!("{head}$!!:!!"),
    ];
    for bad in cases {
        assert!(bad.parse::<ScramVerifier>().is_err(), "{bad}");
    }
    assert_eq!(
        ScramVerifier::new("pencil", b"", 4096),
        Err(ScramError::InvalidVerifier("empty salt"))
    );
    assert_eq!(
        ScramVerifier::new("pencil", b"salt", 4095),
        Err(ScramError::Iterations(4095))
    );
    assert_eq!(
        ScramVerifier::new("", b"salt", 4096),
        Err(ScramError::Saslprep)
    );
    assert_eq!(
        ScramVerifier::new("bell\u{7}", b"salt", 4096),
        Err(ScramError::Saslprep)
    );
}

#[test]
fn saslprep_is_applied() {
    // RFC 4013 §3: "I<U+00AD>X" prepares to "IX".
    let a = ok(ScramVerifier::new("I\u{00AD}X", b"salt", 4096));
    let b = ok(ScramVerifier::new("IX", b"salt", 4096));
    assert_eq!(a, b);
}

/// Runs a whole exchange; the server's result.
fn exchange(
    user: &str,
    password: &str,
    server: &mut ScramServer,
) -> (String, Result<String, ScramError>) {
    let mut client = ok(ScramClient::new(user, password, NONCE));
    let server_first = ok(server.handle_client_first(&client.client_first(), SERVER_NONCE));
    let client_final = ok(client.handle_server_first(&server_first));
    (server_first, server.handle_client_final(&client_final))
}

#[test]
fn a_wrong_password_fails() {
    let (_, result) = exchange("user", "pencil!", &mut ScramServer::new(pencil()));
    assert_eq!(result, Err(ScramError::AuthFailed));
    assert_eq!(ScramError::AuthFailed.to_string(), "authentication failed");
}

#[test]
fn a_generated_verifier_works() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let v = ok(ScramVerifier::generate("Tr0mbone-Kiwi", 4096, &mut rng));
    assert_eq!(v.salt().len(), SALT_LEN);
    let nonce = generate_nonce(&mut rng);
    assert_eq!(nonce.len(), 24);
    let mut client = ok(ScramClient::new("4711", "Tr0mbone-Kiwi", &nonce));
    let mut server = ScramServer::new(v);
    let sf = ok(server.handle_client_first(&client.client_first(), &generate_nonce(&mut rng)));
    let cf = ok(client.handle_server_first(&sf));
    let fin = ok(server.handle_client_final(&cf));
    assert_eq!(client.handle_server_final(&fin), Ok(()));
}

#[test]
fn an_unknown_user_looks_like_a_wrong_password() {
    let pepper = b"the sbc's secret pepper";
    let (real_first, real) = exchange("user", "guess", &mut ScramServer::new(pencil()));
    let mut unknown = ScramServer::for_unknown_user_with_iterations("ghost", pepper, 4096);
    let (fake_first, fake) = exchange("ghost", "guess", &mut unknown);
    assert_eq!(real, Err(ScramError::AuthFailed));
    assert_eq!(fake, real);
    // Same shape: same nonce, a 16-byte salt, the same iteration count.
    let shape = |m: &str| {
        m.split(',')
            .map(|f| (f.len(), f.get(..2).map(str::to_owned)))
            .collect::<Vec<_>>()
    };
    assert_eq!(shape(&fake_first), shape(&real_first));
    // Stable for one user, different for another or another pepper.
    let again = ScramServer::for_unknown_user_with_iterations("ghost", pepper, 4096);
    let mut again = again;
    let (again_first, _) = exchange("ghost", "other", &mut again);
    assert_eq!(again_first, fake_first);
    let (other_first, _) = exchange(
        "ghost2",
        "x",
        &mut ScramServer::for_unknown_user_with_iterations("ghost2", pepper, 4096),
    );
    assert_ne!(other_first.split(',').nth(1), fake_first.split(',').nth(1));
    let (peppered, _) = exchange(
        "ghost",
        "x",
        &mut ScramServer::for_unknown_user_with_iterations("ghost", b"other", 4096),
    );
    assert_ne!(peppered, fake_first);
    // The default answers with the default count.
    let mut default = ScramServer::for_unknown_user("ghost", pepper);
    let sf = ok(default.handle_client_first("n,,n=ghost,r=abc", "def"));
    assert!(sf.ends_with(&format!(",i={DEFAULT_ITERATIONS}")), "{sf}");
    // Logs cannot tell them apart either.
    assert!(!format!("{unknown:?}").contains("unknown"));
}

#[test]
fn client_first_errors() {
    use ScramError::*;
    let cases: &[(&str, ScramError)] = &[
        ("", Malformed("client-first needs a gs2 header")),
        ("n,,", Malformed("an attribute is missing or out of place")),
        ("p=tls-unique,,n=user,r=abc", ChannelBindingUnsupported),
        ("n,a=admin,n=user,r=abc", AuthzidUnsupported),
        (
            "n,x,n=user,r=abc",
            Malformed("bad authorization identity field"),
        ),
        ("q,,n=user,r=abc", Malformed("unknown channel binding flag")),
        ("n,,m=ext,n=user,r=abc", ExtensionUnsupported),
        (
            "n,,n=us=er,r=abc",
            Malformed("'=' in a user name not followed by 2C or 3D"),
        ),
        ("n,,n=,r=abc", Malformed("empty user name")),
        ("n,,n=user,r=", InvalidNonce),
        ("n,,n=user,r=a\u{e9}", InvalidNonce),
        ("n,,n=user", Malformed("a required attribute is missing")),
        (
            "n,,r=abc,n=user",
            Malformed("an attribute is missing or out of place"),
        ),
    ];
    for (msg, want) in cases {
        let mut server = ScramServer::new(pencil());
        assert_eq!(
            server.handle_client_first(msg, SERVER_NONCE).as_ref(),
            Err(want),
            "{msg:?}"
        );
    }
    let mut server = ScramServer::new(pencil());
    assert_eq!(
        server.handle_client_first("n,,n=user,r=abc", "bad,nonce"),
        Err(InvalidNonce)
    );
    // "y": the client could bind but believes the server cannot; accepted.
    let mut server = ScramServer::new(pencil());
    assert!(server.handle_client_first("y,,n=user,r=abc", "def").is_ok());
}

#[test]
fn user_names_are_escaped() {
    let client = ok(ScramClient::new("a,b=c", "pencil", NONCE));
    assert_eq!(
        client.client_first(),
        "n,,n=a=2Cb=3Dc,r=rOprNGfwEbeRWgbNEkqO"
    );
    assert_eq!(ok(client_first_username(&client.client_first())), "a,b=c");
}

#[test]
fn client_final_errors() {
    use ScramError::*;
    let good_nonce = format!("{NONCE}{SERVER_NONCE}");
    let proof = "dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
    let cases: Vec<(String, ScramError)> = vec![
        (String::new(), Malformed("client-final needs a proof")),
        (
            format!("c=biws,r={good_nonce}"),
            Malformed("client-final needs a proof"),
        ),
        (
            format!("c=eSws,r={good_nonce},p={proof}"),
            Malformed("the channel binding does not repeat the gs2 header"),
        ),
        (
            format!("c=!!,r={good_nonce},p={proof}"),
            Malformed("the channel binding is not base64"),
        ),
        (format!("c=biws,r={NONCE},p={proof}"), NonceMismatch),
        (
            format!("c=biws,r={good_nonce},p=AAAA"),
            Malformed("the proof is not 32 bytes"),
        ),
        (
            format!("c=biws,r={good_nonce},p=***"),
            Malformed("the proof is not base64"),
        ),
        (
            format!("r={good_nonce},c=biws,p={proof}"),
            Malformed("an attribute is missing or out of place"),
        ),
        (
            format!("c=biws,r={good_nonce},p=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="),
            AuthFailed,
        ),
    ];
    for (msg, want) in cases {
        let mut server = ScramServer::new(pencil());
        ok(server.handle_client_first(&format!("n,,n=user,r={NONCE}"), SERVER_NONCE));
        assert_eq!(server.handle_client_final(&msg), Err(want), "{msg:?}");
    }
    let mut server = ScramServer::new(pencil());
    assert_eq!(server.handle_client_final("c=biws"), Err(OutOfOrder));
}

#[test]
fn client_refuses_bad_servers() {
    use ScramError::*;
    let cases: Vec<(String, ScramError)> = vec![
        (
            "e=unknown-user".to_owned(),
            ServerRejected("unknown-user".to_owned()),
        ),
        (format!("r=other,s={SALT},i=4096"), NonceMismatch),
        (format!("r={NONCE},s={SALT},i=4096"), NonceMismatch),
        (format!("r={NONCE}x,s={SALT},i=1000"), Iterations(1000)),
        (
            format!("r={NONCE}x,s={SALT},i=4294967295"),
            Iterations(u32::MAX),
        ),
        (
            format!("r={NONCE}x,s={SALT},i=many"),
            Malformed("the iteration count is not a number"),
        ),
        (format!("r={NONCE}x,s=,i=4096"), Malformed("empty salt")),
        (
            format!("r={NONCE}x,s=%%,i=4096"),
            Malformed("the salt is not base64"),
        ),
        (
            format!("r={NONCE}x,i=4096"),
            Malformed("an attribute is missing or out of place"),
        ),
        (
            format!("m=x,r={NONCE}x,s={SALT},i=4096"),
            ExtensionUnsupported,
        ),
    ];
    for (msg, want) in cases {
        let mut client = ok(ScramClient::new("user", "pencil", NONCE));
        assert_eq!(client.handle_server_first(&msg), Err(want), "{msg:?}");
    }
    // A server without the verifier cannot forge server-final.
    let mut client = ok(ScramClient::new("user", "pencil", NONCE));
    let sf = format!("r={NONCE}{SERVER_NONCE},s={SALT},i=4096");
    ok(client.handle_server_first(&sf));
    assert_eq!(
        client.handle_server_final("v=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="),
        Err(ServerSignature)
    );
    let mut client = ok(ScramClient::new("user", "pencil", NONCE));
    ok(client.handle_server_first(&sf));
    assert_eq!(
        client.handle_server_final(INVALID_PROOF),
        Err(ServerRejected("invalid-proof".to_owned()))
    );
    assert!(ScramClient::new("user", "pencil", "a,b").is_err());
    assert!(ScramClient::new("", "pencil", NONCE).is_err());
}

proptest! {
    #[test]
    fn server_never_panics(first in "\\PC{0,60}", fin in "\\PC{0,120}", nonce in "\\PC{0,10}") {
        let mut server = ScramServer::new(pencil_cached());
        let _ = server.handle_client_first(&first, &nonce);
        let _ = server.handle_client_final(&fin);
        let _ = client_first_username(&first);
        let mut server = ScramServer::new(pencil_cached());
        let _ = server.handle_client_first("n,,n=user,r=abc", "def");
        let _ = server.handle_client_final(&fin);
    }

    #[test]
    fn client_never_panics(first in "\\PC{0,60}", fin in "\\PC{0,60}") {
        let mut client = ScramClient::new("user", "pencil", NONCE).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let _ = client.handle_server_first(&first);
        let _ = client.handle_server_final(&fin);
    }

    #[test]
    fn verifier_parsing_never_panics(s in "\\PC{0,80}") {
        let _ = s.parse::<ScramVerifier>();
    }

    #[test]
    fn saslnames_round_trip(name in "[a-z0-9=,]{1,12}") {
        let msg = format!("n,,n={},r=abc", encode_saslname(&name));
        prop_assert_eq!(client_first_username(&msg), Ok(name));
    }
}

/// The pencil verifier, derived once (PBKDF2 is slow in debug builds).
fn pencil_cached() -> ScramVerifier {
    static V: std::sync::OnceLock<ScramVerifier> = std::sync::OnceLock::new();
    V.get_or_init(pencil).clone()
}

/// The RFC 7677 §3 exchange with `client`; the client-final it sent and the server's answer.
fn exchange_with(client: &mut ScramClient) -> (String, Result<String, ScramError>) {
    let mut server = ScramServer::new(pencil());
    let server_first = ok(server.handle_client_first(&client.client_first(), SERVER_NONCE));
    let client_final = ok(client.handle_server_first(&server_first));
    let answer = server.handle_client_final(&client_final);
    (client_final, answer)
}

#[test]
fn cached_keys_give_the_same_proof_and_the_server_accepts_it() {
    // A first exchange derives the keys (PBKDF2) and hands them out once verified.
    let mut first = ok(ScramClient::new("user", "pencil", NONCE));
    assert!(first.verified_keys().is_none());
    let (first_final, answer) = exchange_with(&mut first);
    assert!(!first.used_cached_keys());
    assert!(first.verified_keys().is_none(), "not before server-final");
    assert_eq!(first.handle_server_final(&ok(answer)), Ok(()));
    let keys = first
        .verified_keys()
        .cloned()
        .unwrap_or_else(|| panic!("verified keys"));
    assert_eq!(keys.salt(), ok(B64.decode(SALT)).as_slice());
    assert_eq!(keys.iterations(), 4096);
    assert_eq!(
        keys,
        ok(ScramClientKeys::derive(
            "pencil",
            &ok(B64.decode(SALT)),
            4096
        ))
    );
    // Debug shows what the keys belong to, never the keys.
    assert_eq!(
        format!("{keys:?}"),
        format!("ScramClientKeys {{ salt: {SALT:?}, iterations: 4096, .. }}")
    );

    // The next exchange takes them: the same proof as RFC 7677's, accepted, and the server's
    // signature verifies against the cached ServerKey.
    let mut cached = ok(ScramClient::new("user", "pencil", NONCE)).with_keys(keys.clone());
    let (cached_final, answer) = exchange_with(&mut cached);
    assert!(cached.used_cached_keys());
    assert_eq!(cached_final, first_final);
    assert!(cached_final.ends_with(",p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="));
    assert_eq!(cached.handle_server_final(&ok(answer)), Ok(()));
    assert_eq!(cached.verified_keys(), Some(&keys));
}

#[test]
fn cached_keys_are_used_for_their_salt_and_count_only() {
    let salt = ok(B64.decode(SALT));
    // Keys of another password for the server's salt and count: the client uses them (no
    // PBKDF2 from the password it was given), so the server refuses the proof.
    let wrong = ok(ScramClientKeys::derive("pencil!", &salt, 4096));
    let mut client = ok(ScramClient::new("user", "pencil", NONCE)).with_keys(wrong.clone());
    let (_, answer) = exchange_with(&mut client);
    assert!(client.used_cached_keys());
    assert_eq!(answer, Err(ScramError::AuthFailed));
    assert!(client.verified_keys().is_none());

    // For another salt or another count the same keys are ignored: the password decides.
    for other in [
        ok(ScramClientKeys::derive("pencil!", b"another salt", 4096)),
        ok(ScramClientKeys::derive("pencil!", &salt, 4097)),
    ] {
        let mut client = ok(ScramClient::new("user", "pencil", NONCE)).with_keys(other);
        let (_, answer) = exchange_with(&mut client);
        assert!(!client.used_cached_keys());
        assert_eq!(client.handle_server_final(&ok(answer)), Ok(()));
        assert_eq!(
            client.verified_keys(),
            Some(&ok(ScramClientKeys::derive("pencil", &salt, 4096)))
        );
    }

    // A server that cannot prove the password gets nothing to cache.
    let mut client = ok(ScramClient::new("user", "pencil", NONCE));
    let _ = exchange_with(&mut client);
    assert_eq!(
        client.handle_server_final("v=7rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="),
        Err(ScramError::ServerSignature)
    );
    assert!(client.verified_keys().is_none());

    // Deriving checks what the exchange checks.
    assert_eq!(
        ScramClientKeys::derive("pencil", b"", 4096),
        Err(ScramError::Malformed("empty salt"))
    );
    assert_eq!(
        ScramClientKeys::derive("pencil", &salt, 4095),
        Err(ScramError::Iterations(4095))
    );
    assert_eq!(
        ScramClientKeys::derive("", &salt, 4096),
        Err(ScramError::Saslprep)
    );
}
