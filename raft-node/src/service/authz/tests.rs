//! The decision for every RPC and every kind of caller.

use super::*;

const KV: [&str; 5] = ["Write", "Get", "Dump", "ListMaps", "Watch"];
const ADMIN: [&str; 8] = [
    "Init",
    "AddLearner",
    "Promote",
    "IssueNodeCertificate",
    "Remove",
    "Members",
    "Status",
    "DropMap",
];
const PEER: [&str; 7] = [
    "Vote",
    "PreVote",
    "AppendEntries",
    "InstallSnapshot",
    "Propose",
    "ReadIndex",
    "TransferLeader",
];

fn local() -> Local {
    Local {
        me: 1,
        cluster: "prod".into(),
    }
}

fn value(s: &str) -> http::HeaderValue {
    http::HeaderValue::from_str(s).unwrap()
}

fn api_calls() -> Vec<String> {
    KV.iter()
        .map(|m| format!("/raftmap.v1.Kv/{m}"))
        .chain(ADMIN.iter().map(|m| format!("/raftmap.v1.Admin/{m}")))
        .collect()
}

fn client(role: Role) -> Auth {
    Auth::Verified(Principal::client("prod", role, "ops"))
}

fn peer_md(cluster: &str, from: NodeId, to: NodeId) -> HeaderMap {
    let mut md = HeaderMap::new();
    md.insert(CLUSTER_HEADER, value(cluster));
    md.insert(FROM_HEADER, from.into());
    md.insert(TO_HEADER, to.into());
    md
}

fn decide_api(auth: &Auth, path: &str, md: &HeaderMap) -> Result<Decision, Status> {
    decide(Port::Api, path, auth, md, &local())
}

/// The role each API call needs, as the README's table says.
fn needed(path: &str) -> Role {
    match path.rsplit('/').next().unwrap() {
        "Write" => Role::Writer,
        "Init" | "AddLearner" | "Promote" | "Remove" | "DropMap" | "IssueNodeCertificate" => {
            Role::Admin
        }
        _ => Role::Reader,
    }
}

#[test]
fn every_api_call_is_granted_exactly_to_the_roles_that_include_its_own() {
    let md = HeaderMap::new();
    for path in api_calls() {
        for role in [Role::Reader, Role::Writer, Role::Admin] {
            let r = decide_api(&client(role), &path, &md);
            if role >= needed(&path) {
                let d = r.unwrap_or_else(|e| panic!("{role} {path}: {e:?}"));
                assert_eq!(
                    d.granted,
                    Granted::Direct(Principal::client("prod", role, "ops"))
                );
                assert_eq!(d.member, None);
            } else {
                let e = r.unwrap_err();
                assert_eq!(e.code(), tonic::Code::PermissionDenied, "{role} {path}");
                assert!(
                    e.message()
                        .contains(&format!("needs the {} role", needed(&path))),
                    "{e:?}"
                );
            }
        }
    }
}

#[test]
fn callers_without_a_valid_certificate_are_unauthenticated_everywhere() {
    let md = peer_md("prod", 2, 1);
    for auth in [
        Auth::NoCertificate,
        Auth::Invalid("the certificate has expired".into()),
    ] {
        for path in api_calls() {
            let e = decide_api(&auth, &path, &md).unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unauthenticated, "{path}");
        }
        for m in PEER {
            let e = decide(
                Port::Peer,
                &format!("/raftmap.v1.Peer/{m}"),
                &auth,
                &md,
                &local(),
            )
            .unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unauthenticated, "{m}");
        }
    }
    let e = decide_api(
        &Auth::Invalid("the certificate has expired".into()),
        "/raftmap.v1.Kv/Get",
        &md,
    )
    .unwrap_err();
    assert!(e.message().contains("expired"), "{e:?}");
}

#[test]
fn a_certificate_of_another_cluster_is_refused() {
    let other = Auth::Verified(Principal::client("staging", Role::Admin, "ops"));
    let e = decide_api(&other, "/raftmap.v1.Kv/Get", &HeaderMap::new()).unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    assert!(
        e.message()
            .contains("cluster staging, this is cluster prod"),
        "{e:?}"
    );
}

#[test]
fn peer_calls_come_from_member_nodes_as_themselves_and_to_this_node() {
    let node2 = Auth::Verified(Principal::node("prod", 2));
    for m in PEER {
        let path = format!("/raftmap.v1.Peer/{m}");
        let peer = |auth: &Auth, md: &HeaderMap| decide(Port::Peer, &path, auth, md, &local());
        let d = peer(&node2, &peer_md("prod", 2, 1)).unwrap();
        assert_eq!(d.granted, Granted::Peer(2));
        // The membership check follows: node 2 must be a member.
        assert_eq!(d.member, Some(2), "{m}");
        let refused = [
            (
                peer(&node2, &peer_md("prod", 3, 1)),
                "the certificate is node 2's, the call claims to come from node 3",
            ),
            (
                peer(&node2, &peer_md("other", 2, 1)),
                "from cluster other, this is cluster prod",
            ),
            (
                peer(&node2, &peer_md("prod", 2, 4)),
                "meant for node 4, this is node 1",
            ),
            (
                peer(&client(Role::Admin), &peer_md("prod", 2, 1)),
                "may not speak the peer protocol",
            ),
            (
                peer(
                    &Auth::Verified(Principal::node("prod", 1)),
                    &peer_md("prod", 1, 1),
                ),
                "which is this node",
            ),
        ];
        for (r, why) in refused {
            let e = r.unwrap_err();
            assert_eq!(e.code(), tonic::Code::PermissionDenied, "{m}");
            assert!(e.message().contains(why), "{m}: {e:?}");
        }
        let e = peer(&node2, &HeaderMap::new()).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{m}");
        // Without TLS the ids are still checked; membership is left to the messages.
        let d = peer(&Auth::Insecure, &peer_md("prod", 2, 1)).unwrap();
        assert_eq!(d.member, None);
        assert!(peer(&Auth::Insecure, &peer_md("prod", 2, 4)).is_err());
        // The peer protocol is not served on the API port, nor the API on the peer port.
        let e = decide(Port::Api, &path, &node2, &peer_md("prod", 2, 1), &local()).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unimplemented);
    }
    let e = decide(
        Port::Peer,
        "/raftmap.v1.Kv/Write",
        &node2,
        &peer_md("prod", 2, 1),
        &local(),
    )
    .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unimplemented);
}

#[test]
fn a_node_certificate_may_only_join_and_read_status_unless_it_forwards() {
    let node2 = Auth::Verified(Principal::node("prod", 2));
    let md = HeaderMap::new();
    for path in api_calls() {
        let joins_or_reads = node_may(&path);
        let r = decide_api(&node2, &path, &md);
        assert_eq!(r.is_ok(), joins_or_reads, "{path}: {r:?}");
        if let Err(e) = r {
            assert_eq!(e.code(), tonic::Code::PermissionDenied);
        }
    }
    // Forwarding for a writer: what the writer may call, and no more.
    let mut fwd = HeaderMap::new();
    let writer = Principal::client("prod", Role::Writer, "app");
    fwd.insert(FORWARDED_FOR_HEADER, value(&writer.uri()));
    for path in api_calls() {
        let r = decide_api(&node2, &path, &fwd);
        if needed(&path) <= Role::Writer {
            let d = r.unwrap();
            assert_eq!(
                d.granted,
                Granted::Forwarded {
                    via: 2,
                    caller: writer.clone()
                }
            );
            assert_eq!(d.member, Some(2), "only a member forwards");
        } else {
            assert_eq!(
                r.unwrap_err().code(),
                tonic::Code::PermissionDenied,
                "{path}"
            );
        }
    }
    // A client cannot forward: the header is ignored and its own role counts.
    let reader = client(Role::Reader);
    let mut admin_fwd = HeaderMap::new();
    admin_fwd.insert(
        FORWARDED_FOR_HEADER,
        Principal::client("prod", Role::Admin, "x")
            .uri()
            .parse()
            .unwrap(),
    );
    assert!(decide_api(&reader, "/raftmap.v1.Admin/Remove", &admin_fwd).is_err());
}

#[test]
fn a_node_adds_and_promotes_only_itself() {
    let node = Granted::Direct(Principal::node("prod", 5));
    assert!(check_self(Some(&node), 5).is_ok());
    let e = check_self(Some(&node), 6).unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    let forwarded = Granted::Forwarded {
        via: 2,
        caller: Principal::node("prod", 5),
    };
    assert!(check_self(Some(&forwarded), 6).is_err());
    let admin = Granted::Direct(Principal::client("prod", Role::Admin, "ops"));
    assert!(check_self(Some(&admin), 6).is_ok());
    assert!(check_self(Some(&Granted::Anyone), 6).is_ok());
}

#[test]
fn an_enrollment_credential_may_only_obtain_node_certificates() {
    let md = HeaderMap::new();
    let enroller = Principal::enroller("prod", "agents");
    let auth = Auth::Verified(enroller.clone());
    for path in api_calls() {
        let r = decide_api(&auth, &path, &md);
        if path.ends_with("/IssueNodeCertificate") {
            assert_eq!(r.unwrap().granted, Granted::Direct(enroller.clone()));
        } else {
            let e = r.unwrap_err();
            assert_eq!(e.code(), tonic::Code::PermissionDenied, "{path}");
            assert!(
                e.message().contains("may only obtain node certificates"),
                "{e:?}"
            );
        }
    }
    for m in PEER {
        let e = decide(
            Port::Peer,
            &format!("/raftmap.v1.Peer/{m}"),
            &auth,
            &peer_md("prod", 2, 1),
            &local(),
        )
        .unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{m}");
    }
    // Nor may a member forward for it.
    let mut fwd = HeaderMap::new();
    fwd.insert(FORWARDED_FOR_HEADER, value(&enroller.uri()));
    let e = decide_api(
        &Auth::Verified(Principal::node("prod", 2)),
        "/raftmap.v1.Kv/Get",
        &fwd,
    )
    .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
}

#[test]
fn without_tls_every_api_call_is_allowed() {
    for path in api_calls() {
        let d = decide_api(&Auth::Insecure, &path, &HeaderMap::new()).unwrap();
        assert_eq!(d.granted, Granted::Anyone);
    }
}
