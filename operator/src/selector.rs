//! Label selector matching (matchLabels and matchExpressions), for deciding whether a
//! namespace may place Tenants on a cluster.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

pub fn matches(sel: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let labels_ok = sel
        .match_labels
        .as_ref()
        .is_none_or(|m| m.iter().all(|(k, v)| labels.get(k) == Some(v)));
    let exprs_ok = sel.match_expressions.as_ref().is_none_or(|es| {
        es.iter().all(|e| {
            let vals = e.values.clone().unwrap_or_default();
            let got = labels.get(&e.key);
            match e.operator.as_str() {
                "In" => got.is_some_and(|g| vals.contains(g)),
                "NotIn" => got.is_none_or(|g| !vals.contains(g)),
                "Exists" => got.is_some(),
                "DoesNotExist" => got.is_none(),
                _ => false,
            }
        })
    });
    labels_ok && exprs_ok
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    use super::*;

    #[test]
    fn labels_and_expressions() {
        let l = BTreeMap::from([("granary.dev/storage".to_string(), "allowed".to_string())]);
        let mut s = LabelSelector {
            match_labels: Some(l.clone()),
            ..Default::default()
        };
        assert!(matches(&s, &l));
        assert!(!matches(&s, &BTreeMap::new()));
        s.match_expressions = Some(vec![LabelSelectorRequirement {
            key: "tier".into(),
            operator: "NotIn".into(),
            values: Some(vec!["x".into()]),
        }]);
        assert!(matches(&s, &l));
        s.match_expressions = Some(vec![LabelSelectorRequirement {
            key: "tier".into(),
            operator: "Exists".into(),
            values: None,
        }]);
        assert!(!matches(&s, &l));
        assert!(
            matches(&LabelSelector::default(), &BTreeMap::new()),
            "empty selector matches everything"
        );
    }
}
