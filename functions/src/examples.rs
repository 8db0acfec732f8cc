//! The example projects under `examples/`, built in: `hookyard dev` deploys one, the
//! worker benchmark runs it.

/// `examples/crm-contacts`: path → source.
pub const CRM_CONTACTS: &[(&str, &str)] = &[
    ("index.js", include_str!("../../examples/crm-contacts/index.js")),
    (
        "demo/models.js",
        include_str!("../../examples/crm-contacts/demo/models.js"),
    ),
    (
        "demo/syncs/contacts.js",
        include_str!("../../examples/crm-contacts/demo/syncs/contacts.js"),
    ),
];

/// A project's files as `compile_project` takes them.
pub fn files(project: &[(&str, &str)]) -> std::collections::BTreeMap<String, String> {
    project.iter().map(|(p, s)| (p.to_string(), s.to_string())).collect()
}
