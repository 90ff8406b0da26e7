//! Random and mutated bytes to every RPC of the real gRPC port: whatever a client sends, the
//! answer is never INTERNAL (a message that does not decode, a string that is not UTF-8, a
//! NUL in text or JSON are the caller's mistakes).

use std::time::Duration;

use dsreg::api::grpc::pb;
use dsreg::api::grpc::pb::datasources_client::DatasourcesClient;
use prost::Message;
use rand::{Rng, SeedableRng};
use tonic::Code;

use crate::helpers::{RawCodec, TestDb};

/// Every method of every `dsreg.v1` service, as a request path.
fn methods() -> Vec<String> {
    let set = prost_types::FileDescriptorSet::decode(pb::FILE_DESCRIPTOR_SET).unwrap();
    let mut paths = Vec::new();
    for file in &set.file {
        for service in &file.service {
            for method in &service.method {
                paths.push(format!(
                    "/{}.{}/{}",
                    file.package(),
                    service.name(),
                    method.name()
                ));
            }
        }
    }
    assert!(paths.len() >= 20, "{paths:?}");
    paths
}

/// A length-delimited field.
fn field(number: u32, bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    prost::encoding::encode_key(number, prost::encoding::WireType::LengthDelimited, &mut out);
    prost::encoding::encode_varint(bytes.len() as u64, &mut out);
    out.extend_from_slice(bytes);
    out
}

/// Messages that go wrong in the ways a client can make them go wrong.
fn seeds(id: &str) -> Vec<Vec<u8>> {
    let nul_json = br#"{"a": "x\u0000y", "template": {"k\u0000": 1}}"#.to_vec();
    let mut seeds = vec![Vec::new(), vec![0xff; 12], vec![0x0a, 0x80]];
    for n in 1..=10 {
        seeds.push(field(n, &[0xff, 0xfe, b'a']));
        seeds.push(field(n, b"a\0b"));
        seeds.push(field(n, &nul_json));
        let mut varint = Vec::new();
        prost::encoding::encode_key(n, prost::encoding::WireType::Varint, &mut varint);
        varint.extend_from_slice(&[0xff; 9]);
        varint.push(0x01);
        seeds.push(varint);
        // The same with a real datasource first, to get past the id check.
        if n > 1 {
            let mut with_id = field(1, id.as_bytes());
            with_id.extend(field(n, b"a\0b"));
            seeds.push(with_id.clone());
            let mut with_id = field(1, id.as_bytes());
            with_id.extend(field(n, &nul_json));
            seeds.push(with_id);
            let mut with_id = field(1, id.as_bytes());
            with_id.extend(field(n, &[b'{', 0xc3, 0x28, b'}']));
            seeds.push(with_id);
        }
    }
    seeds
}

#[tokio::test]
async fn random_and_mutated_bytes_to_every_rpc_never_answer_internal() {
    let db = TestDb::new().await;
    let (_app, ch) = crate::grpc::serve(&db).await;
    let id = DatasourcesClient::new(ch.clone())
        .create_datasource(pb::CreateDatasourceRequest {
            org: "acme".into(),
            project: "ingest".into(),
            name: "fuzzed".into(),
            kind: "generator".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .id;
    let mut rng = rand::rngs::StdRng::seed_from_u64(21);
    let seeds = seeds(&id);
    let mut internal = Vec::new();
    let mut calls = 0;
    // Proof the payloads reach the checks they aim at.
    let (mut undecodable, mut nul) = (0, 0);

    for path in methods() {
        let mut payloads = seeds.clone();
        for seed in &seeds {
            let mut mutated = seed.clone();
            if !mutated.is_empty() {
                let at = rng.random_range(0..mutated.len());
                mutated[at] ^= 1 << rng.random_range(0..8);
                payloads.push(mutated);
            }
        }
        for _ in 0..20 {
            let len = rng.random_range(1..64);
            payloads.push((0..len).map(|_| rng.random::<u8>()).collect());
        }
        for payload in payloads {
            calls += 1;
            let mut grpc = tonic::client::Grpc::new(ch.clone());
            grpc.ready().await.unwrap();
            let mut request = tonic::Request::new(payload.clone());
            request.set_timeout(Duration::from_secs(2));
            let answer = tokio::time::timeout(Duration::from_secs(5), async {
                let response = grpc
                    .server_streaming(request, path.parse().unwrap(), RawCodec)
                    .await?;
                let mut stream = response.into_inner();
                // A watch that decoded stays open: its first answer (or none) is enough.
                match tokio::time::timeout(Duration::from_millis(100), stream.message()).await {
                    Ok(message) => message.map(|_| ()),
                    Err(_) => Ok(()),
                }
            })
            .await;
            let Ok(Err(status)) = answer else { continue };
            if matches!(status.code(), Code::Internal | Code::Unknown) {
                internal.push(format!("{path} {payload:02x?}: {status:?}"));
            } else if status.code() == Code::InvalidArgument {
                undecodable += usize::from(status.message().contains("does not decode"));
                nul += usize::from(status.message().contains("NUL"));
            }
        }
    }

    assert!(calls > 1_000, "{calls} calls");
    assert!(
        undecodable > 100,
        "{undecodable} answers named an undecodable request"
    );
    assert!(nul > 10, "{nul} answers named a NUL character");
    assert!(
        internal.is_empty(),
        "{} of {calls} calls answered INTERNAL:\n{}",
        internal.len(),
        internal.join("\n")
    );
}

#[tokio::test]
async fn nul_characters_are_refused_before_the_database_naming_the_field() {
    use tonic_types::StatusExt;
    let db = TestDb::new().await;
    let (_app, ch) = crate::grpc::serve(&db).await;
    let mut ds = DatasourcesClient::new(ch.clone());
    let id = ds
        .create_datasource(crate::grpc::create_req("nul"))
        .await
        .unwrap()
        .into_inner()
        .id;

    let config = ds
        .create_version(pb::CreateVersionRequest {
            datasource_id: id.clone(),
            config_json: r#"{"rate_per_sec": 1, "template": {"a": "x\u0000y"}}"#.into(),
            comment: String::new(),
        })
        .await
        .unwrap_err();
    let description = ds
        .create_datasource(pb::CreateDatasourceRequest {
            org: "acme".into(),
            project: "ingest".into(),
            name: "other".into(),
            kind: "generator".into(),
            description: "a\0b".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();

    for (status, field) in [(&config, "config_json"), (&description, "description")] {
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        let details = status.get_details_bad_request().expect("field details");
        assert_eq!(details.field_violations[0].field, field);
    }
    assert!(config.message().contains("/template/a"), "{config:?}");
}
