//! The nemesis's tests: partition shapes and fault parsing.

use rand::SeedableRng;

use super::shapes::grudges;
use super::*;

fn hears(g: &BTreeMap<NodeId, Vec<NodeId>>, a: NodeId, b: NodeId) -> bool {
    !g.get(&a).is_some_and(|d| d.contains(&b)) && !g.get(&b).is_some_and(|d| d.contains(&a))
}

#[test]
fn partition_shapes_cut_what_they_say() {
    let ids = [1, 2, 3, 4, 5];
    let mut rng = StdRng::seed_from_u64(1);
    let (g, what) = grudges(Shape::LeaderInMinority, &ids, Some(3), &mut rng);
    assert!(
        what.starts_with("partition leader in minority [3 "),
        "{what}"
    );
    // The leader hears exactly one other node; the majority side hears each other.
    assert_eq!(
        ids.iter().filter(|&&i| i != 3 && hears(&g, 3, i)).count(),
        1
    );

    let (g, what) = grudges(Shape::Bridge, &ids, None, &mut rng);
    let bridge: NodeId = what.rsplit(' ').next().unwrap().parse().unwrap();
    for i in ids {
        assert!(hears(&g, bridge, i), "{what}: bridge must hear {i}");
    }
    let cut = ids
        .iter()
        .flat_map(|&a| ids.iter().map(move |&b| (a, b)))
        .filter(|&(a, b)| a < b && !hears(&g, a, b))
        .count();
    assert_eq!(cut, 4, "{what}: two halves of two cut both ways");

    let (g, _) = grudges(Shape::Ring, &ids, None, &mut rng);
    for i in ids {
        let heard = ids.iter().filter(|&&j| j != i && hears(&g, i, j)).count();
        assert_eq!(heard, 2, "node {i} must hear its two neighbours only");
    }

    let (g, _) = grudges(Shape::LeaderAlone, &[1, 2, 3], Some(2), &mut rng);
    assert!(!hears(&g, 2, 1) && !hears(&g, 2, 3) && hears(&g, 1, 3));
}

#[test]
fn clock_faults_are_refused_with_the_reason() {
    let e = "clock".parse::<Fault>().unwrap_err();
    assert!(e.contains("one clock"), "{e}");
    assert_eq!("membership".parse::<Fault>(), Ok(Fault::Membership));
}
