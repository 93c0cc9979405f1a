//! Property tests: label and selector rules against an independent regex
//! oracle, and arbitrary sequences of register / heartbeat / deregister /
//! time passing against a simple reference model of SPEC §2's semantics, on
//! paused tokio time.

use std::collections::BTreeMap;
use std::time::Duration;

use executor_registry::registry::{
    Labels, Registration, Registry, RegistryConfig, RegistryError, Selector, SelectorOp, Status,
    check_label_part,
};
use proptest::prelude::*;

/// SPEC §2's label rule, as the regex it is written as.
fn oracle(s: &str) -> bool {
    let re = regex::Regex::new(r"^[a-zA-Z0-9]([-.a-zA-Z0-9]*[a-zA-Z0-9])?$").expect("valid");
    !s.is_empty() && s.len() <= 63 && re.is_match(s)
}

/// Strings near the rule's edges: its alphabet, a few bytes outside it,
/// lengths around 63.
fn label_part() -> impl Strategy<Value = String> {
    prop_oneof![
        "[-.a-zA-Z0-9]{0,70}",
        "[-.a-zA-Z0-9_ é/]{0,8}",
        "[a-z0-9]{61,65}",
        any::<String>(),
    ]
}

proptest! {
    #[test]
    fn label_rule_matches_the_spec_regex(s in label_part()) {
        prop_assert_eq!(check_label_part(&s).is_ok(), oracle(&s), "{:?}", s);
    }

    #[test]
    fn label_sets_are_accepted_exactly_when_every_part_is_valid(
        pairs in proptest::collection::vec((label_part(), label_part()), 0..70)
    ) {
        let keys: std::collections::HashSet<_> = pairs.iter().map(|(k, _)| k.clone()).collect();
        let valid = pairs.len() <= 64
            && keys.len() == pairs.len()
            && pairs.iter().all(|(k, v)| oracle(k) && oracle(v));
        match Labels::new(pairs.clone()) {
            Ok(labels) => {
                prop_assert!(valid);
                for (k, v) in &pairs {
                    prop_assert_eq!(labels.get(k), Some(v.as_str()));
                }
            }
            Err(RegistryError::InvalidArgument { field, .. }) => {
                prop_assert!(!valid);
                prop_assert_eq!(field, "labels");
            }
            Err(other) => prop_assert!(false, "{other:?}"),
        }
    }

    #[test]
    fn selectors_follow_eq_neq_and_whole_value_regex(
        key in "[a-c]",
        target in "[a-c]{1,3}",
        labels in proptest::collection::btree_map("[a-c]", "[a-c]{1,3}", 0..3),
    ) {
        let set = Labels::new(labels.clone()).expect("valid labels");
        let value = labels.get(&key);
        let eq = Selector::new(&key, &target, Some(SelectorOp::Eq)).expect("valid");
        let neq = Selector::new(&key, &target, Some(SelectorOp::Neq)).expect("valid");
        let re = Selector::new(&key, &target, Some(SelectorOp::Regex)).expect("valid");
        prop_assert_eq!(eq.matches(set.view()), value == Some(&target));
        prop_assert_eq!(neq.matches(set.view()), value != Some(&target));
        // A literal pattern matches only the whole value.
        prop_assert_eq!(re.matches(set.view()), value == Some(&target));
    }
}

/// One step of a client's life.
#[derive(Debug, Clone)]
enum Op {
    Register,
    /// Heartbeat executor `n` (modulo those registered) with a TTL of
    /// `ttl` × 10 ms + 5 ms (deadlines never coincide with the 10 ms steps
    /// at which the test looks), or 0 (keep).
    Heartbeat(usize, u64),
    Deregister(usize),
    /// Let `n` × 10 ms pass.
    Wait(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => Just(Op::Register),
        4 => (any::<usize>(), prop_oneof![Just(0u64), 1u64..40]).prop_map(|(n, t)| Op::Heartbeat(n, t)),
        1 => any::<usize>().prop_map(Op::Deregister),
        3 => (1u64..60).prop_map(Op::Wait),
    ]
}

/// The reference model: SPEC §2's semantics, nothing else.
#[derive(Debug, Default)]
struct Model {
    /// id → (status, deadline ms, ttl ms)
    live: BTreeMap<String, (Status, u64, u64)>,
    tombstones: std::collections::HashSet<String>,
}

const INIT_TTL_MS: u64 = 205;

impl Model {
    fn expire(&mut self, now: u64) {
        let dead: Vec<_> = self
            .live
            .iter()
            .filter(|(_, (_, deadline, _))| *deadline <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in dead {
            self.live.remove(&id);
            self.tombstones.insert(id);
        }
    }

    fn heartbeat(&mut self, id: &str, ttl: u64, now: u64) -> Result<(), &'static str> {
        if ttl != 0 && !(100..=600_000).contains(&ttl) {
            return Err("invalid");
        }
        match self.live.get_mut(id) {
            Some((status, deadline, current)) => {
                if ttl != 0 {
                    *current = ttl;
                }
                *deadline = now + *current;
                *status = Status::Running;
                Ok(())
            }
            None if self.tombstones.contains(id) => Err("tombstone"),
            None => Err("unknown"),
        }
    }
}

fn kind(e: &RegistryError) -> &'static str {
    match e {
        RegistryError::InvalidArgument { .. } => "invalid",
        RegistryError::NotFound(_) => "unknown",
        RegistryError::Tombstone(_) => "tombstone",
        _ => "other",
    }
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let config = RegistryConfig {
            init_ttl: Duration::from_millis(INIT_TTL_MS),
            min_ttl: Duration::from_millis(100),
            ..RegistryConfig::default()
        };
        let (registry, task) = Registry::start_in_memory(config);
        let mut model = Model::default();
        let mut ids: Vec<String> = Vec::new();
        let start = registry.clock().now_ms();
        let now = |r: &Registry| r.clock().now_ms() - start;
        for op in ops {
            match op {
                Op::Register => {
                    let entry = registry
                        .register(Registration {
                            name: "m".into(),
                            address: "10.0.0.1:1".into(),
                            labels: vec![],
                            owner: None,
                        })
                        .await
                        .expect("register");
                    let id = entry.id().to_string();
                    model.live.insert(
                        id.clone(),
                        (Status::Initing, now(&registry) + INIT_TTL_MS, INIT_TTL_MS),
                    );
                    ids.push(id);
                }
                Op::Heartbeat(n, ttl) if !ids.is_empty() => {
                    let id = ids[n % ids.len()].clone();
                    let ttl_ms = if ttl == 0 { 0 } else { ttl * 10 + 5 };
                    let got = registry
                        .heartbeat(&id, (ttl_ms > 0).then(|| Duration::from_millis(ttl_ms)))
                        .map(|_| ())
                        .map_err(|e| kind(&e));
                    let want = model.heartbeat(&id, ttl_ms, now(&registry));
                    prop_assert_eq!(got, want, "heartbeat {} ttl {}", id, ttl_ms);
                }
                Op::Deregister(n) if !ids.is_empty() => {
                    let id = ids[n % ids.len()].clone();
                    let got = registry.deregister(&id).await.map_err(|e| kind(&e));
                    let want = match model.live.remove(&id) {
                        Some(_) => {
                            model.tombstones.insert(id.clone());
                            Ok(())
                        }
                        None => Err("unknown"),
                    };
                    prop_assert_eq!(got, want, "deregister {}", id);
                }
                Op::Wait(n) => {
                    tokio::time::sleep(Duration::from_millis(n * 10)).await;
                    model.expire(now(&registry));
                }
                _ => {}
            }
            // After every step the registry and the model agree on who is
            // live, and with which status.
            let snapshot = registry.snapshot();
            let got: BTreeMap<String, Status> = snapshot
                .iter()
                .map(|(e, _)| (e.id().to_string(), e.status()))
                .collect();
            let want: BTreeMap<String, Status> = model
                .live
                .iter()
                .map(|(id, (s, _, _))| (id.clone(), *s))
                .collect();
            prop_assert_eq!(&got, &want);
            prop_assert_eq!(
                registry.count(Some(Status::Running)) as usize,
                want.values().filter(|s| **s == Status::Running).count()
            );
            prop_assert_eq!(
                registry.count(Some(Status::Initing)) as usize,
                want.values().filter(|s| **s == Status::Initing).count()
            );
        }
        task.stop().await;
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_request_sequences_agree_with_the_reference_model(
        ops in proptest::collection::vec(op(), 1..80)
    ) {
        run(ops)?;
    }
}
