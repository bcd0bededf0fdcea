use futures_util::StreamExt;

use super::*;

fn message(n: usize) -> PeerMessage {
    from(Uuid::nil(), n)
}

/// An offer from `source`.
fn from(source: Uuid, n: usize) -> PeerMessage {
    PeerMessage {
        peer: PeerConnection {
            source_uuid: source,
            source_name: "peer".into(),
            peer_uuid: Uuid::nil(),
            description_type: "offer".into(),
            description: n.to_string(),
            error: None,
        },
        bounced: false,
    }
}

fn answer(source: Uuid, n: usize) -> PeerMessage {
    let mut m = from(source, n);
    m.peer.description_type = "answer".into();
    m
}

fn bounce(peer: Uuid, n: usize) -> PeerMessage {
    let mut m = from(Uuid::nil(), n);
    m.peer.peer_uuid = peer;
    m.peer.error = Some("not registered".into());
    m.bounced = true;
    m
}

fn limits(subscriber_queue: usize, backlog: usize) -> Limits {
    Limits {
        subscriber_queue,
        subscriber_queue_bytes: 1 << 20,
        backlog,
        backlog_bytes: 1 << 20,
        backlog_ttl: Duration::from_secs(10),
        affinity: Duration::from_secs(60),
        conversation_ttl: Duration::from_secs(60),
        unclaimed_offers: UnclaimedOffers::Refuse,
    }
}

struct Fixture {
    router: Arc<Router>,
    counters: Arc<Counters>,
    refused: mpsc::Receiver<Refusal>,
}

fn with(limits: Limits) -> Fixture {
    let counters = Arc::new(Counters::default());
    let (router, refused) = Router::new(limits, Arc::clone(&counters));
    Fixture {
        router,
        counters,
        refused,
    }
}

fn router(subscriber_queue: usize, backlog: usize) -> (Arc<Router>, Arc<Counters>) {
    let f = with(limits(subscriber_queue, backlog));
    (f.router, f.counters)
}

fn join(router: &Arc<Router>, group: Option<String>, worker: Worker) -> Subscription {
    let interest = Interest {
        group,
        ..Interest::default()
    };
    router.subscribe(interest, worker).unwrap()
}

/// A conversation subscription for `worker`, in `group`.
fn converse(router: &Arc<Router>, group: Option<&str>, worker: &str) -> Subscription {
    let interest = Interest {
        group: group.map(str::to_owned),
        conversations: true,
        ..Interest::default()
    };
    router.subscribe(interest, Worker::label(worker)).unwrap()
}

fn drain(sub: &mut Subscription) -> Vec<String> {
    let mut out = Vec::new();
    while let Ok(m) = sub.rx.try_recv() {
        sub.queued.fetch_sub(m.cost(), Ordering::Relaxed);
        out.push(m.peer.description.clone());
    }
    out
}

#[test]
fn backlog_goes_to_the_first_subscriber_and_drops_the_oldest() {
    let (router, counters) = router(8, 3);
    for n in 0..5 {
        router.dispatch(answer(Uuid::nil(), n));
    }
    let mut sub = join(&router, None, Worker::label("w"));
    assert_eq!(drain(&mut sub), ["2", "3", "4"]);
    assert_eq!(counters.snapshot().dropped_no_subscriber, 2);
}

#[test]
fn groups_share_and_ungrouped_see_everything() {
    let (router, counters) = router(100, 10);
    let mut a1 = join(&router, Some("a".into()), Worker::process(1));
    let mut a2 = join(&router, Some("a".into()), Worker::process(1));
    let mut solo = join(&router, None, Worker::label("w"));
    for n in 0..10 {
        router.dispatch(message(n));
    }
    let (got1, got2) = (drain(&mut a1), drain(&mut a2));
    assert_eq!(got1.len() + got2.len(), 10);
    assert_eq!(got1, ["0", "2", "4", "6", "8"]);
    assert_eq!(drain(&mut solo).len(), 10);
    assert_eq!(counters.snapshot().delivered, 20);
}

#[test]
fn full_member_passes_its_turn_and_full_group_counts_a_drop() {
    let (router, counters) = router(1, 10);
    let mut a1 = join(&router, Some("a".into()), Worker::process(1));
    let mut a2 = join(&router, Some("a".into()), Worker::process(1));
    for n in 0..3 {
        router.dispatch(message(n));
    }
    assert_eq!(drain(&mut a1), ["0"]);
    assert_eq!(drain(&mut a2), ["1"]);
    assert_eq!(counters.snapshot().dropped_queue_full, 1);
}

#[test]
fn a_queue_is_bounded_in_bytes_as_well() {
    let mut l = limits(1000, 10);
    let one = answer(Uuid::nil(), 0).cost();
    l.subscriber_queue_bytes = 3 * one;
    let f = with(l);
    let mut sub = join(&f.router, None, Worker::label("w"));
    for n in 0..5 {
        f.router.dispatch(answer(Uuid::nil(), n));
    }
    assert_eq!(drain(&mut sub), ["0", "1", "2"]);
    assert_eq!(f.counters.snapshot().dropped_queue_full, 2);
    // Read: room again.
    f.router.dispatch(answer(Uuid::nil(), 5));
    assert_eq!(drain(&mut sub), ["5"]);
}

#[tokio::test]
async fn dropping_a_subscription_unsubscribes_at_once() {
    let (router, _) = router(4, 4);
    let mut sub = join(&router, None, Worker::label("w"));
    router.dispatch(message(0));
    assert_eq!(sub.next().await.unwrap().peer.description, "0");
    assert_eq!(router.subscribers(), 1);
    drop(sub);
    assert_eq!(router.subscribers(), 0);
    // With nobody left, messages wait in the backlog again.
    router.dispatch(answer(Uuid::nil(), 1));
    let mut next = join(&router, None, Worker::label("w"));
    assert_eq!(drain(&mut next), ["1"]);
}

#[tokio::test(start_paused = true)]
async fn backlog_messages_expire_and_are_counted() {
    let f = with(limits(8, 8));
    f.router.dispatch(answer(Uuid::nil(), 0));
    tokio::time::advance(Duration::from_secs(6)).await;
    f.router.dispatch(answer(Uuid::nil(), 1));
    tokio::time::advance(Duration::from_secs(5)).await;
    f.router.sweep_once(Instant::now());
    assert_eq!(f.counters.snapshot().dropped_expired, 1);
    let mut sub = join(&f.router, None, Worker::label("w"));
    assert_eq!(drain(&mut sub), ["1"]);
}

/// A flood of offers queues at most REFUSALS_QUEUED answers; the rest are
/// refused all the same (counted), only unanswered.
#[test]
fn refusals_queued_for_the_relay_are_bounded() {
    let mut f = with(limits(8, 8));
    let offers = REFUSALS_QUEUED + 44;
    for n in 0..offers {
        f.router.dispatch(from(Uuid::new_v4(), n));
    }
    assert_eq!(f.counters.snapshot().offers_refused, offers as u64);
    let mut queued = 0;
    while f.refused.try_recv().is_ok() {
        queued += 1;
    }
    assert_eq!(queued, REFUSALS_QUEUED);
}

#[test]
fn an_offer_with_nobody_subscribed_is_refused_not_kept() {
    let mut f = with(limits(8, 8));
    let peer = Uuid::new_v4();
    f.router.dispatch(from(peer, 0));
    f.router.dispatch(answer(peer, 1));
    assert_eq!(
        f.refused.try_recv().unwrap(),
        Refusal {
            peer,
            why: RefusalReason::NoWorker
        }
    );
    assert!(f.refused.try_recv().is_err(), "the answer is not refused");
    assert_eq!(f.counters.snapshot().offers_refused, 1);
    let mut sub = join(&f.router, None, Worker::label("w"));
    assert_eq!(drain(&mut sub), ["1"], "only the answer waited");

    // Set to keep them: kept like anything else.
    let mut l = limits(8, 8);
    l.unclaimed_offers = UnclaimedOffers::Backlog;
    let mut f = with(l);
    f.router.dispatch(from(peer, 0));
    assert!(f.refused.try_recv().is_err());
    let mut sub = join(&f.router, None, Worker::label("w"));
    assert_eq!(drain(&mut sub), ["0"]);
}

#[test]
fn an_offer_this_host_sent_itself_waits_for_a_subscriber() {
    // Nobody is there to be told "no worker": the host is its own sender.
    let mut f = with(limits(8, 8));
    let me = Uuid::new_v4();
    let mut offer = from(me, 0);
    offer.peer.peer_uuid = me;
    f.router.dispatch(offer);
    assert!(f.refused.try_recv().is_err());
    assert_eq!(f.counters.snapshot().offers_refused, 0);
    let mut sub = join(&f.router, None, Worker::label("w"));
    assert_eq!(drain(&mut sub), ["0"]);
}

#[test]
fn replies_follow_the_worker_that_sent_and_fall_back_when_it_leaves() {
    let (router, _) = router(100, 10);
    let (p1, p2) = (Uuid::new_v4(), Uuid::new_v4());
    let (w1, w2) = (Worker::label("w1"), Worker::label("w2"));
    let mut s1 = join(&router, Some("g".into()), w1.clone());
    let mut s2 = join(&router, Some("g".into()), w2.clone());
    let mut other_group = join(&router, Some("h".into()), Worker::label("x"));
    router.note_send(&w1, p1);
    router.note_send(&w2, p2);
    for n in 0..4 {
        router.dispatch(from(p1, n));
        router.dispatch(from(p2, 10 + n));
    }
    assert_eq!(drain(&mut s1), ["0", "1", "2", "3"]);
    assert_eq!(drain(&mut s2), ["10", "11", "12", "13"]);
    // Another group still gets every message once.
    assert_eq!(drain(&mut other_group).len(), 8);

    // A bounce of w2's send to p1 would be keyed by p1; the latest send wins.
    router.note_send(&w2, p1);
    router.dispatch(from(p1, 20));
    assert_eq!(drain(&mut s2), ["20"]);

    // w2 leaves: its peers' messages go to the rest of the group.
    drop(s2);
    router.dispatch(from(p2, 30));
    assert_eq!(drain(&mut s1), ["30"]);
}

#[tokio::test(start_paused = true)]
async fn affinity_expires() {
    let (router, _) = router(100, 10);
    let peer = Uuid::new_v4();
    let mut s1 = join(&router, Some("g".into()), Worker::label("w1"));
    let mut s2 = join(&router, Some("g".into()), Worker::label("w2"));
    router.note_send(&Worker::label("w2"), peer);
    router.dispatch(from(peer, 0));
    assert_eq!(drain(&mut s2), ["0"]);
    tokio::time::advance(Duration::from_secs(61)).await;
    // Back to taking turns: w1's turn comes first.
    router.dispatch(from(peer, 1));
    router.dispatch(from(peer, 2));
    assert_eq!(drain(&mut s1), ["1"]);
    assert_eq!(drain(&mut s2), ["2"]);
}

#[test]
fn a_group_is_forgotten_when_its_last_member_leaves() {
    let (router, _) = router(4, 4);
    for n in 0..100 {
        drop(join(
            &router,
            Some(format!("group-{n}")),
            Worker::process(n),
        ));
    }
    let inner = router.lock();
    assert!(inner.groups.is_empty() && inner.solo.is_empty());
}

#[test]
fn an_exclusive_group_admits_one_subscriber_until_it_leaves() {
    let (router, _) = router(4, 4);
    let exclusive = |group: &str| Interest {
        group: Some(group.into()),
        exclusive: true,
        ..Interest::default()
    };
    let plain = |group: &str| Interest {
        group: Some(group.into()),
        ..Interest::default()
    };
    let no_group = Interest {
        exclusive: true,
        ..Interest::default()
    };
    assert_eq!(
        router.subscribe(no_group, Worker::label("e")).unwrap_err(),
        RouterError::ExclusiveWithoutGroup
    );
    let held = router
        .subscribe(exclusive("endpoint"), Worker::label("e1"))
        .unwrap();
    for interest in [exclusive("endpoint"), plain("endpoint")] {
        assert_eq!(
            router.subscribe(interest, Worker::label("e2")).unwrap_err(),
            RouterError::GroupHeld {
                group: "endpoint".into()
            }
        );
    }
    // Other groups are not affected.
    let _other = router
        .subscribe(exclusive("other"), Worker::label("o"))
        .unwrap();
    drop(held);
    let shared = join(&router, Some("endpoint".into()), Worker::label("s"));
    assert_eq!(
        router
            .subscribe(exclusive("endpoint"), Worker::label("e3"))
            .unwrap_err(),
        RouterError::GroupInUse {
            group: "endpoint".into()
        }
    );
    drop(shared);
    // A conversation subscription can hold a group too.
    let interest = Interest {
        conversations: true,
        ..exclusive("endpoint")
    };
    let _again = router.subscribe(interest, Worker::label("e4")).unwrap();
    assert!(
        router
            .subscribe(plain("endpoint"), Worker::label("e5"))
            .is_err()
    );
}

#[tokio::test]
async fn a_peers_offer_starts_a_conversation_with_exactly_one_worker() {
    let f = with(limits(100, 10));
    let router = &f.router;
    // Conversation subscribers in different groups, and none: still one.
    let mut a = converse(router, None, "a");
    let mut b = converse(router, Some("proxystore"), "b");
    let mut c = converse(router, Some("other"), "c");
    let mut observer = join(router, None, Worker::label("relayctl"));
    let (p1, p2) = (Uuid::new_v4(), Uuid::new_v4());
    router.dispatch(from(p1, 0));
    router.dispatch(from(p2, 10));
    router.dispatch(answer(p1, 1));
    router.dispatch(from(p1, 2));
    router.dispatch(answer(p2, 11));
    let got = [drain(&mut a), drain(&mut b), drain(&mut c)];
    assert_eq!(got[0], ["0", "1", "2"], "{got:?}");
    assert_eq!(got[1], ["10", "11"], "{got:?}");
    assert!(got[2].is_empty(), "{got:?}");
    assert_eq!(
        drain(&mut observer).len(),
        5,
        "plain subscribers still see it all"
    );
    assert_eq!(router.conversations(), 2);
    // Both are held: another worker may not write to them.
    for claim in [true, false] {
        assert!(matches!(
            router.try_clear_to_send(&Worker::label("c"), p1, claim),
            Err(RouterError::Held { peer, ref holder, .. }) if peer == p1 && holder == "a"
        ));
    }
    assert_eq!(f.counters.snapshot().conversation_conflicts, 2);
    // The holder may, claiming or not.
    assert_eq!(
        router.try_clear_to_send(&Worker::label("a"), p1, true),
        Ok(Some(Claimed::Renewed))
    );
    assert_eq!(
        router.try_clear_to_send(&Worker::label("a"), p1, false),
        Ok(None)
    );
}

#[tokio::test]
async fn a_send_claims_and_the_peers_messages_go_to_the_claimant_only() {
    let f = with(limits(100, 10));
    let router = &f.router;
    let (mut a, mut b) = (converse(router, None, "a"), converse(router, None, "b"));
    let peer = Uuid::new_v4();
    assert_eq!(
        router
            .clear_to_send(&Worker::label("b"), peer, true, None)
            .await,
        Ok(Some(Claimed::New))
    );
    for n in 0..3 {
        router.dispatch(answer(peer, n));
    }
    assert_eq!(drain(&mut b), ["0", "1", "2"]);
    assert!(drain(&mut a).is_empty());
    // A message about nobody's conversation that is not an offer goes
    // nowhere (with no plain subscriber to see it), counted.
    router.dispatch(answer(Uuid::new_v4(), 9));
    assert!(drain(&mut a).is_empty() && drain(&mut b).is_empty());
    assert_eq!(f.counters.snapshot().dropped_no_conversation, 1);
    // Without a conversation subscription, a worker cannot claim.
    assert_eq!(
        router.try_clear_to_send(&Worker::label("z"), Uuid::new_v4(), true),
        Err(RouterError::NoConversationSubscription { worker: "z".into() })
    );
}

#[test]
fn a_full_holder_loses_its_peers_messages_to_nobody_else() {
    let f = with(limits(1, 10));
    let router = &f.router;
    let (mut a, mut b) = (converse(router, None, "a"), converse(router, None, "b"));
    let peer = Uuid::new_v4();
    router.dispatch(from(peer, 0));
    router.dispatch(answer(peer, 1));
    router.dispatch(answer(peer, 2));
    let (got_a, got_b) = (drain(&mut a), drain(&mut b));
    assert_eq!((got_a.len(), got_b.len()), (1, 0), "{got_a:?} {got_b:?}");
    assert_eq!(f.counters.snapshot().dropped_queue_full, 2);
}

#[test]
fn an_offer_nobody_can_take_is_refused() {
    let mut f = with(limits(1, 10));
    let router = &f.router;
    let mut a = converse(router, None, "a");
    let (p1, p2) = (Uuid::new_v4(), Uuid::new_v4());
    router.dispatch(from(p1, 0));
    router.dispatch(from(p2, 1));
    assert_eq!(drain(&mut a), ["0"]);
    assert_eq!(
        f.refused.try_recv().unwrap(),
        Refusal {
            peer: p2,
            why: RefusalReason::Busy
        }
    );
    assert_eq!(router.conversations(), 1, "the refused offer holds nothing");
}

#[tokio::test]
async fn a_conversation_ends_with_its_holders_last_subscription_and_a_waiter_gets_it() {
    let f = with(limits(100, 10));
    let router = Arc::clone(&f.router);
    let a1 = converse(&router, None, "a");
    let a2 = converse(&router, None, "a");
    let _b = converse(&router, None, "b");
    let peer = Uuid::new_v4();
    router
        .clear_to_send(&Worker::label("a"), peer, true, None)
        .await
        .unwrap();
    let waiting = {
        let router = Arc::clone(&router);
        tokio::spawn(async move {
            let until = Instant::now() + Duration::from_secs(30);
            router
                .clear_to_send(&Worker::label("b"), peer, true, Some(until))
                .await
        })
    };
    tokio::task::yield_now().await;
    drop(a1);
    assert_eq!(router.conversations(), 1, "a still has a subscription");
    drop(a2);
    assert_eq!(waiting.await.unwrap(), Ok(Some(Claimed::New)));
    assert_eq!(f.counters.snapshot().conversation_conflicts, 0);
}

#[tokio::test]
async fn a_bounce_ends_the_conversation_after_reaching_its_holder() {
    let f = with(limits(100, 10));
    let router = &f.router;
    let mut a = converse(router, None, "a");
    let peer = Uuid::new_v4();
    router
        .clear_to_send(&Worker::label("a"), peer, true, None)
        .await
        .unwrap();
    router.dispatch(bounce(peer, 7));
    assert_eq!(drain(&mut a), ["7"]);
    assert_eq!(router.conversations(), 0);
    let _b = converse(router, None, "b");
    assert_eq!(
        router.try_clear_to_send(&Worker::label("b"), peer, true),
        Ok(Some(Claimed::New))
    );
}

#[tokio::test(start_paused = true)]
async fn silence_ends_a_conversation_and_a_wait_is_bounded() {
    let f = with(limits(100, 10));
    let router = &f.router;
    let (_a, _b) = (converse(router, None, "a"), converse(router, None, "b"));
    let peer = Uuid::new_v4();
    router.hold(&Worker::label("a"), peer, None).await.unwrap();
    let until = Instant::now() + Duration::from_secs(5);
    assert!(matches!(
        router.hold(&Worker::label("b"), peer, Some(until)).await,
        Err(RouterError::Held { .. })
    ));
    assert_eq!(
        Instant::now(),
        until,
        "waited until the deadline, no longer"
    );
    tokio::time::advance(Duration::from_secs(56)).await;
    router.sweep_once(Instant::now());
    assert_eq!(router.conversations(), 0);
    assert_eq!(f.counters.snapshot().conversations_expired, 1);
    assert_eq!(
        router.hold(&Worker::label("b"), peer, None).await,
        Ok(Duration::from_secs(60))
    );
    assert!(!router.release(&Worker::label("a"), peer));
    assert!(router.release(&Worker::label("b"), peer));
}
