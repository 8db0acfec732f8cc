//! The example projects under `examples/`, built in: `hookyard dev` deploys one, the
//! worker benchmark runs it.

/// `examples/crm-contacts` (TypeScript): path → source.
pub const CRM_CONTACTS: &[(&str, &str)] = &[
    ("index.ts", include_str!("../../examples/crm-contacts/index.ts")),
    (
        "demo/models.ts",
        include_str!("../../examples/crm-contacts/demo/models.ts"),
    ),
    (
        "demo/syncs/contacts.ts",
        include_str!("../../examples/crm-contacts/demo/syncs/contacts.ts"),
    ),
    (
        "demo/actions/find-contact.ts",
        include_str!("../../examples/crm-contacts/demo/actions/find-contact.ts"),
    ),
];

/// A project's files as `compile_project` takes them.
pub fn files(project: &[(&str, &str)]) -> std::collections::BTreeMap<String, String> {
    project.iter().map(|(p, s)| (p.to_string(), s.to_string())).collect()
}
