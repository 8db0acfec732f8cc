//! The function engine end to end: compile a project, run its handlers on the pool,
//! and fail each kind of bad function the way the worker reports it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hookyard_core::store::records::WriteKind;
use hookyard_core::store::MetadataWrite;
use hookyard_functions::compile::{compile_project, Project};
use hookyard_functions::pool::{Pool, Sizing, SyncCode};
use hookyard_functions::{ErrorKind, Handler, Host, Invocation, Limits, RecordValidation};
use serde_json::json;
use std::sync::Mutex;

fn limits() -> Limits {
    Limits {
        memory_bytes: 16 * 1024 * 1024,
        stack_bytes: 256 * 1024,
        cpu_budget: Duration::from_millis(300),
        timeout: Duration::from_secs(2),
    }
}

fn project(files: &[(&str, &str)]) -> Project {
    compile_project(
        files.iter().map(|(p, s)| (p.to_string(), s.to_string())).collect(),
        &limits(),
    )
    .unwrap_or_else(|e| panic!("deploy failed: {e}"))
}

fn deploy_error(files: &[(&str, &str)]) -> String {
    compile_project(
        files.iter().map(|(p, s)| (p.to_string(), s.to_string())).collect(),
        &limits(),
    )
    .map(|_| ())
    .expect_err("the deploy should fail")
    .to_string()
}

fn code(project: &Project, name: &str) -> Arc<SyncCode> {
    let sync = project
        .syncs
        .iter()
        .find(|s| s.name == name)
        .expect("the sync is deployed");
    Arc::new(SyncCode::new(
        &project.bundle.hash,
        &sync.entry,
        Arc::new(project.bundle.modules.clone()),
    ))
}

fn invocation(payload: serde_json::Value) -> Invocation {
    Invocation {
        payload: payload.to_string().into(),
        connection_id: "conn-1".into(),
        provider_config_key: "crm".into(),
        metadata: json!({"region": "eu"}).to_string().into(),
        connection: json!({"connection_id": "conn-1", "provider": "hubspot", "metadata": {"region": "eu"}})
            .to_string()
            .into(),
        models: json!(["Contact"]).to_string().into(),
        handler: Default::default(),
        host: None,
        validation: Default::default(),
        environment_variables: json!([{"name": "TEAM_ID", "value": "team-1"}]).to_string().into(),
    }
}

/// An exec run whose `nango` calls `host`.
fn exec_on(host: Arc<dyn Host>) -> Invocation {
    Invocation {
        handler: Handler::Exec,
        host: Some(host),
        ..invocation(json!(null))
    }
}

/// A sync with an hourly `exec` whose body is `body`.
fn exec_sync(body: &str) -> String {
    format!(
        "import {{ createSync }} from 'nango';
         export default createSync({{
           frequency: 'every hour',
           models: {{ Contact: {{}} }},
           exec: async (nango) => {{ {body} }},
         }});"
    )
}

/// A sync `crm/syncs/{name}.js` whose onWebhook body is `body`.
fn sync_with(body: &str) -> String {
    format!(
        "import {{ createSync }} from 'nango';
         export default createSync({{
           models: {{ Contact: {{}} }},
           webhookSubscriptions: ['*'],
           onWebhook: async (nango, payload) => {{ {body} }},
         }});"
    )
}

/// Runs the `contacts` sync's onWebhook on a `contact.updated` event of contact 7.
async fn contact_7_updated(pool: &Pool, project: &Project) -> hookyard_functions::Effects {
    pool.execute(
        code(project, "contacts"),
        invocation(json!({"type": "contact.updated", "contact": {"id": 7, "email": "a@x"}})),
    )
    .await
    .unwrap()
}

const CONTACTS: &str = r#"
import { createSync } from 'nango';
import { toContact } from '../models.js';
export default createSync({
  description: 'contacts',
  version: '1.0.0',
  frequency: 'every hour',
  models: { Contact: {} },
  webhookSubscriptions: ['contact.updated', 'contact.deleted'],
  exec: async () => {},
  onWebhook: async (nango, payload) => {
    await new Promise((resolve) => setTimeout(resolve, 5));
    const meta = await nango.getMetadata();
    console.log('handling', payload.type);
    if (payload.type === 'contact.deleted') {
      await nango.batchDelete([{ id: payload.contact.id }], 'Contact');
    } else {
      await nango.batchSave([toContact(payload.contact, meta.region)], 'Contact');
    }
    await nango.updateMetadata({ last: payload.contact.id });
  },
});
"#;
const MODELS: &str = "export const toContact = (c, region) => ({ id: c.id, email: c.email, region });";

#[tokio::test]
async fn a_sync_compiles_once_and_its_handler_collects_writes_metadata_and_logs() {
    let project = project(&[("crm/syncs/contacts.js", CONTACTS), ("crm/models.js", MODELS)]);
    assert_eq!(project.syncs.len(), 1);
    let sync = &project.syncs[0];
    assert_eq!((sync.integration.as_str(), sync.name.as_str()), ("crm", "contacts"));
    assert_eq!(
        sync.config["webhookSubscriptions"],
        json!(["contact.updated", "contact.deleted"])
    );
    assert_eq!(sync.config["models"], json!(["Contact"]));
    assert_eq!(sync.config["frequency"], json!("every hour"));
    assert_eq!(sync.config["exec"], json!(true));

    let pool = Pool::new(2, limits());
    let effects = contact_7_updated(&pool, &project).await;
    assert_eq!(effects.writes.len(), 1);
    assert_eq!(effects.writes[0].kind, WriteKind::Save);
    assert_eq!(effects.writes[0].model, "Contact");
    assert_eq!(
        effects.writes[0].records,
        vec![("7".to_string(), json!({"id": 7, "email": "a@x", "region": "eu"}))]
    );
    assert_eq!(
        effects.metadata,
        vec![(MetadataWrite::Merge, json!({"last": 7}).as_object().unwrap().clone())]
    );
    assert_eq!(effects.logs[0].message, "handling contact.updated");

    let effects = pool
        .execute(
            code(&project, "contacts"),
            invocation(json!({"type": "contact.deleted", "contact": {"id": "9"}})),
        )
        .await
        .unwrap();
    assert_eq!(effects.writes[0].kind, WriteKind::Delete);
    assert_eq!(effects.writes[0].records[0].0, "9");
}

#[tokio::test]
async fn each_failure_has_its_kind_and_the_pool_keeps_working() {
    let project = project(&[
        (
            "crm/syncs/throws.js",
            &sync_with("throw new Error('provider said no');"),
        ),
        (
            "crm/syncs/rejects.js",
            &sync_with("await Promise.reject(new TypeError('bad input'));"),
        ),
        ("crm/syncs/loops.js", &sync_with("while (true) {}")),
        (
            "crm/syncs/catches_loop.js",
            &sync_with("try { while (true) {} } catch (e) {} await nango.batchSave([{id: 'x'}], 'Contact');"),
        ),
        (
            "crm/syncs/waits.js",
            &sync_with("await new Promise((r) => setTimeout(r, 60000));"),
        ),
        ("crm/syncs/never.js", &sync_with("await new Promise(() => {});")),
        (
            "crm/syncs/recurses.js",
            &sync_with("const f = (n) => f(n + 1) + 1; f(0);"),
        ),
        (
            "crm/syncs/allocates.js",
            &sync_with("const keep = []; while (true) keep.push(new Array(100000).fill(1));"),
        ),
        (
            "crm/syncs/allocates_strings.js",
            &sync_with("const a = []; while (true) a.push('x'.repeat(1000));"),
        ),
        ("crm/syncs/evals.js", &sync_with("eval('1');")),
        (
            "crm/syncs/constructs.js",
            &sync_with("(function(){}).constructor('return 1')();"),
        ),
        (
            "crm/syncs/bad_model.js",
            &sync_with("await nango.batchSave([{id: 1}], 'Company');"),
        ),
        (
            "crm/syncs/no_id.js",
            &sync_with("await nango.batchSave([{name: 'x'}], 'Contact');"),
        ),
        (
            "crm/syncs/ok.js",
            &sync_with("await nango.batchSave([{id: 'fine'}], 'Contact');"),
        ),
        // Nango's error for callers, and its provider.
        (
            "crm/syncs/action_error.js",
            &sync_with("throw new nango.ActionError({ message: 'no email' });"),
        ),
        (
            "crm/syncs/action_error_payload.js",
            &sync_with("throw new nango.ActionError({ code: 'missing', field: 'email' });"),
        ),
        (
            "crm/syncs/action_error_circular.js",
            &sync_with("const p = { code: 'loop' }; p.self = p; throw new nango.ActionError(p);"),
        ),
        (
            "crm/syncs/provider.js",
            &sync_with(
                "const none = await nango.getFieldMapping();
                 await nango.updateMetadata({ fieldMapping: { email: 'Email__c' } });
                 const mapped = await nango.getFieldMapping();
                 await nango.batchSave([{ id: nango.provider, none, mapped }], 'Contact');",
            ),
        ),
    ]);
    let pool = Pool::new(2, limits());
    let run = |name: &str| pool.execute(code(&project, name), invocation(json!({})));
    let cases = [
        (
            "throws",
            ErrorKind::Thrown,
            "Error: provider said no\n    at onWebhook (crm/syncs/throws.js:",
        ),
        ("rejects", ErrorKind::Thrown, "TypeError: bad input"),
        ("loops", ErrorKind::Timeout, "CPU budget"),
        ("catches_loop", ErrorKind::Timeout, "CPU budget"),
        ("waits", ErrorKind::Timeout, "did not finish within"),
        ("never", ErrorKind::Thrown, "can never settle"),
        ("recurses", ErrorKind::StackOverflow, "stack"),
        ("allocates", ErrorKind::OutOfMemory, "out of memory"),
        ("allocates_strings", ErrorKind::OutOfMemory, "out of memory"),
        ("evals", ErrorKind::Thrown, "eval"),
        ("constructs", ErrorKind::Thrown, "code generation from strings"),
        (
            "bad_model",
            ErrorKind::Thrown,
            "model \"Company\" is not one of this sync's models",
        ),
        ("no_id", ErrorKind::Thrown, "every record needs an id"),
        (
            "action_error",
            ErrorKind::Thrown,
            "ActionError: no email\n    at onWebhook (crm/syncs/action_error.js:",
        ),
        (
            "action_error_payload",
            ErrorKind::Thrown,
            r#"ActionError: {"code":"missing","field":"email"}"#,
        ),
        (
            "action_error_circular",
            ErrorKind::Thrown,
            "ActionError: [object Object]",
        ),
    ];
    for (name, kind, text) in cases {
        let started = Instant::now();
        let error = run(name).await.expect_err(name);
        assert_eq!(error.kind, kind, "{name}: {error}");
        assert!(error.message.contains(text), "{name}: {error}");
        assert!(!error.message.contains("eval_script"), "the prelude's frames: {error}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{name} took {:?}",
            started.elapsed()
        );
        // The pool still runs good code after each failure, on every thread.
        for _ in 0..pool.threads() {
            let effects = run("ok").await.expect("a good function still runs");
            assert_eq!(effects.writes[0].records[0].0, "fine");
        }
    }
    let effects = run("provider").await.unwrap();
    assert_eq!(
        effects.writes[0].records[0],
        (
            "hubspot".to_string(),
            json!({"id": "hubspot", "none": {}, "mapped": {"email": "Email__c"}})
        )
    );
}

#[test]
fn bad_deploys_name_the_file_and_the_problem() {
    let cases: Vec<(Vec<(&str, String)>, &str)> = vec![
        (
            vec![("crm/syncs/a.js", "export default createSync({".into())],
            "invalid property name\n    at crm/syncs/a.js:1:28",
        ),
        (
            vec![("crm/syncs/a.js", "import { x } from 'node:fs'; export default {};".into())],
            "cannot import \"node:fs\": a function may import 'nango', 'zod', 'crypto', 'url', 'buffer' and the files of its own deploy",
        ),
        (
            vec![(
                "crm/syncs/a.js",
                "export default { type: 'sync', webhookSubscriptions: 'contact.updated', onWebhook() {} };".into(),
            )],
            "crm/syncs/a.js: webhookSubscriptions must be an array",
        ),
        (
            vec![(
                "crm/syncs/a.js",
                "export default { webhookSubscriptions: ['x'] };".into(),
            )],
            "crm/syncs/a.js: it subscribes to webhooks (webhookSubscriptions) but has no onWebhook",
        ),
        (
            vec![("crm/syncs/a.js", "export default { exec: async () => {}, trackDeletes: 'yes' };".into())],
            "crm/syncs/a.js: trackDeletes must be true or false",
        ),
        (
            vec![("crm/syncs/a.js", "export default { models: { Contact: {} } };".into())],
            "crm/syncs/a.js: it has neither an exec nor an onWebhook: nothing of it would ever run",
        ),
        (
            // Nango's older format: nango.yaml held the configuration.
            vec![(
                "crm/syncs/a.js",
                "export default async function fetchData(nango) {}\nexport async function onWebhookPayloadReceived() {}".into(),
            )],
            "crm/syncs/a.js: its default export is a function (Nango's older nango.yaml format, which is not read)",
        ),
        (
            vec![("crm/syncs/a.js", "throw new Error('top level');".into())],
            "crm/syncs/a.js: thrown: Error: top level",
        ),
        (
            vec![("crm/syncs/a.js", "while (true) {}".into())],
            "crm/syncs/a.js: timeout",
        ),
        (
            vec![("crm/syncs/a.ts", "const a = 1;\nenum Kind { Contact }\nexport default {};".into())],
            "crm/syncs/a.ts: TypeScript that cannot be deployed:\n2:1: TypeScript enum is not supported in strip-only mode",
        ),
        (
            vec![("crm/syncs/a.ts", "export default { models: {} as };".into())],
            "crm/syncs/a.ts: TypeScript that cannot be deployed:\n1:32: Unexpected token",
        ),
        (
            vec![
                ("crm/models.ts", "export interface Contact { id: string }".into()),
                ("crm/syncs/a.ts", "import { Contact } from '../models';\nexport default {};".into()),
            ],
            "import type",
        ),
        (
            vec![
                ("index.js", "import './crm/syncs/a.js';".into()),
                ("index.ts", "import './crm/syncs/a.js';".into()),
                ("crm/syncs/a.ts", "export default {};".into()),
            ],
            "the deploy has 2 index files (index.js, index.ts): keep one",
        ),
        (
            vec![("crm/syncs/a.py", "print('hi')".into())],
            "crm/syncs/a.py: only JavaScript and TypeScript modules",
        ),
        (vec![("crm/helpers.js", "export const x = 1;".into())], "no functions found"),
        (
            vec![(
                "crm/syncs/a.js",
                "export default { frequency: 'every 10s', exec() {} };".into(),
            )],
            "crm/syncs/a.js: frequency \"every 10s\" is more often than every 30 seconds",
        ),
        (
            vec![(
                "crm/syncs/a.js",
                "export default { frequency: 'now and then', exec() {} };".into(),
            )],
            "crm/syncs/a.js: frequency \"now and then\" is not understood",
        ),
        (
            vec![("crm/syncs/a.js", "export default { frequency: 'every hour' };".into())],
            "crm/syncs/a.js: it has a frequency but no exec",
        ),
        (
            vec![("../crm/syncs/a.js", "export default {}".into())],
            "must be relative",
        ),
        (
            vec![("CRM Inc/syncs/a.js", "export default {}".into())],
            "is not an integration key",
        ),
    ];
    for (files, expected) in cases {
        let files: Vec<(&str, &str)> = files.iter().map(|(p, s)| (*p, s.as_str())).collect();
        let error = deploy_error(&files);
        assert!(error.contains(expected), "{files:?}: {error}");
    }
}

const TS_MODELS: &str = "// The Contact model.
export interface Contact {
  id: string;
  email: string | null;
}
export type RawContact = { id: number | string; email?: string };

export function toContact(raw: RawContact, region?: string): Contact & { region?: string } {
  return { id: String(raw.id), email: raw.email ?? null, region } satisfies Contact;
}
";

const TS_CONTACTS: &str = "import { createSync } from 'nango';
import type { NangoSync } from 'nango';
import { toContact, type RawContact } from '../models.js';

interface Payload {
  type: 'contact.updated' | 'contact.deleted';
  contact?: RawContact;
}

class Counter {
  private count: number = 0;
  public next(): number { return ++this.count; }
}

export default createSync({
  models: { Contact: {} as Record<string, unknown> },
  webhookSubscriptions: ['contact.updated'] as const,
  onWebhook: async (nango: NangoSync, payload: Payload): Promise<void> => {
    const seen = new Counter();
    seen.next();
    if (!payload.contact) {
      throw new Error(`no contact in ${payload.type as string}`);
    }
    const meta = await nango.getMetadata<{ region: string }>();
    await nango.batchSave([toContact(payload.contact!, meta.region)], 'Contact');
  },
});
";

#[tokio::test]
async fn typescript_deploys_with_its_types_erased_and_its_errors_at_its_own_lines() {
    let project = project(&[
        ("index.ts", "import './crm/syncs/contacts.js';"),
        ("crm/models.ts", TS_MODELS),
        ("crm/syncs/contacts.ts", TS_CONTACTS),
        (
            "crm/syncs/types.d.ts",
            "declare module 'nango' { export type NangoSync = any; }",
        ),
    ]);
    let names: Vec<&str> = project.syncs.iter().map(|s| s.entry.as_str()).collect();
    assert_eq!(
        names,
        vec!["crm/syncs/contacts.ts"],
        "the index chose the sync; .d.ts is not one"
    );
    assert_eq!(
        project.syncs[0].config["webhookSubscriptions"],
        json!(["contact.updated"])
    );
    assert_eq!(
        project.bundle.sources["crm/syncs/contacts.ts"], TS_CONTACTS,
        "the bundle keeps the TypeScript as written"
    );
    assert!(!project.bundle.sources.contains_key("crm/syncs/types.d.ts"));

    let pool = Pool::new(1, limits());
    let effects = contact_7_updated(&pool, &project).await;
    assert_eq!(
        effects.writes[0].records,
        vec![("7".to_string(), json!({"id": "7", "email": "a@x", "region": "eu"}))]
    );

    let line = 1 + TS_CONTACTS.lines().position(|l| l.contains("throw new Error")).unwrap();
    let error = pool
        .execute(
            code(&project, "contacts"),
            invocation(json!({"type": "contact.updated"})),
        )
        .await
        .expect_err("no contact");
    assert_eq!(error.kind, ErrorKind::Thrown);
    assert!(
        error.message.starts_with(&format!(
            "Error: no contact in contact.updated\n    at onWebhook (crm/syncs/contacts.ts:{line}:"
        )),
        "{error}"
    );
}

/// Nango's functions declare their models with zod, imported by name.
#[tokio::test]
async fn zod_is_built_in_for_models_and_checks() {
    let sync = "import { createSync } from 'nango';
import * as z from 'zod';
import zod, { z as named } from 'zod';

const Contact = z.object({ id: z.string(), email: z.email().nullable() });
type Contact = z.infer<typeof Contact>;

export default createSync({
  models: { Contact },
  webhookSubscriptions: ['*'],
  onWebhook: async (nango, payload: unknown) => {
    if (zod !== named || typeof zod.object !== 'function') {
      throw new Error('the default export is not z');
    }
    const contact: Contact = Contact.parse(payload);
    await nango.batchSave([contact], 'Contact');
  },
});
";
    let project = project(&[("crm/syncs/contacts.ts", sync)]);
    assert_eq!(project.syncs[0].config["models"], json!(["Contact"]));
    assert!(
        !project.bundle.sources.contains_key("zod"),
        "zod is the engine's, not the deploy's"
    );
    let pool = Pool::new(1, limits());
    let run = |payload| pool.execute(code(&project, "contacts"), invocation(payload));
    let effects = run(json!({"id": "c1", "email": "ada@example.com", "extra": 1}))
        .await
        .unwrap();
    assert_eq!(
        effects.writes[0].records,
        vec![("c1".to_string(), json!({"id": "c1", "email": "ada@example.com"}))],
        "parsed by the model: unknown keys stripped"
    );
    let error = run(json!({"id": "c2", "email": "not an email"})).await.unwrap_err();
    assert_eq!(error.kind, ErrorKind::Thrown);
    assert!(
        error.message.starts_with("ZodError: ") && error.message.contains("Invalid email address"),
        "{error}"
    );
}

/// batchSave checks records against a zod model as Nango does: a warning by default, a
/// failure when asked, nothing when off; batchUpdate (partial records) and models that
/// are not schemas are not checked.
#[tokio::test]
async fn saved_records_are_checked_against_their_zod_model() {
    let sync = "import { createSync } from 'nango';
import * as z from 'zod';
const Contact = z.object({ id: z.string(), email: z.email().nullable() });
export default createSync({
  models: { Contact, Note: {} },
  webhookSubscriptions: ['*'],
  onWebhook: async (nango) => {
    await nango.batchSave([{ id: 'c1', email: null }, { id: 'c2', email: 'nope' }, { id: 3, email: null }], 'Contact');
    await nango.batchUpdate([{ id: 'c1' }], 'Contact');
    await nango.batchSave([{ id: 'n1', anything: true }], 'Note');
  },
});
";
    let project = project(&[("crm/syncs/contacts.ts", sync)]);
    let pool = Pool::new(1, limits());
    let run = |validation| {
        let mut run = invocation(json!({}));
        run.models = json!(["Contact", "Note"]).to_string().into();
        run.validation = validation;
        pool.execute(code(&project, "contacts"), run)
    };
    let warned = run(RecordValidation::Warn).await.unwrap();
    assert_eq!(warned.writes[0].records.len(), 3, "saved all the same");
    let warnings: Vec<&str> = warned
        .logs
        .iter()
        .filter(|l| l.level == "warn")
        .map(|l| l.message.as_str())
        .collect();
    assert_eq!(
        warnings,
        ["batchSave: 2 of 3 record(s) do not match the Contact model; the first, id \"c2\": email: Invalid email address"]
    );
    let failed = run(RecordValidation::Fail).await.unwrap_err();
    assert_eq!(failed.kind, ErrorKind::Thrown);
    assert!(
        failed.message.starts_with("TypeError: batchSave: 2 of 3 record(s)"),
        "{failed}"
    );
    let off = run(RecordValidation::Off).await.unwrap();
    assert!(off.logs.is_empty(), "{:?}", off.logs);
    assert_eq!(off.writes.len(), 3);
}

/// A Nango project's actions deploy with it as functions of type `action`; their folder
/// and their kind must agree.
#[test]
fn actions_deploy_as_functions() {
    let action = "import { createAction } from 'nango';
export default createAction({ exec: async () => ({ ok: true }) });";
    let sync = "export default { type: 'sync', webhookSubscriptions: ['*'], onWebhook: async () => {} };";
    let project = project(&[
        (
            "index.ts",
            "import './crm/syncs/contacts.js';\nimport './crm/actions/create-contact.js';",
        ),
        ("crm/syncs/contacts.ts", sync),
        ("crm/actions/create-contact.ts", action),
        ("crm/actions/draft.ts", action),
    ]);
    let kinds: Vec<(&str, &serde_json::Value)> = project
        .syncs
        .iter()
        .map(|s| (s.name.as_str(), &s.config["type"]))
        .collect();
    assert_eq!(
        kinds,
        vec![
            ("create-contact", &json!("action")),
            ("contacts", &serde_json::Value::Null)
        ],
        "the ones the index imports"
    );
    let action_config = &project.syncs[0].config;
    assert_eq!(
        (&action_config["exec"], &action_config["onWebhook"]),
        (&json!(false), &json!(false)),
        "never scheduled, never on a webhook"
    );

    // An action-only project deploys.
    assert_eq!(
        project_of_one("crm/actions/create-contact.ts", action),
        "create-contact"
    );
    let error = deploy_error(&[("crm/actions/create-contact.ts", sync)]);
    assert!(
        error.ends_with("a file in actions/ must export createAction({...})"),
        "{error}"
    );
    let error = deploy_error(&[("crm/syncs/create-contact.ts", action)]);
    assert!(error.contains("an action (createAction) lives at"), "{error}");
    let error = deploy_error(&[("crm/actions/contacts.ts", action), ("crm/syncs/contacts.ts", sync)]);
    assert!(error.contains("crm has two functions named \"contacts\""), "{error}");
    let error = deploy_error(&[(
        "crm/actions/x.ts",
        "import { createAction } from 'nango'; export default createAction({});",
    )]);
    assert!(error.ends_with("an action needs an exec"), "{error}");
}

fn project_of_one(path: &str, source: &str) -> String {
    project(&[(path, source)]).syncs[0].name.clone()
}

/// An action's `exec(nango, input)`: the input as given, the output as returned; input its
/// schema refuses is not run; a thrown error's type and payload are kept for the caller.
#[tokio::test]
async fn an_action_runs_with_its_input_and_answers_its_output() {
    let action = "import { createAction } from 'nango';
import * as z from 'zod';
export default createAction({
  input: z.object({ name: z.string() }),
  output: z.object({ id: z.string() }),
  exec: async (nango, input) => {
    if (input.name === 'refused') throw new nango.ActionError({ message: 'refused here', name: input.name });
    if (input.name === 'upstream') await nango.get({ endpoint: '/fail' });
    if (input.name === 'bad-output') return { id: 7 };
    if (input.name === 'nothing') return undefined;
    if (input.name === 'plain') throw new Error('plain');
    const response = await nango.post({ endpoint: '/contacts', data: input });
    return { id: `${response.status}-${input.name}` };
  },
});";
    let project = project(&[("crm/actions/create-contact.ts", action)]);
    let pool = Pool::new(1, limits());
    let host = Arc::new(FakeHost::default());
    let run = |input: serde_json::Value, validation: RecordValidation| {
        pool.execute(
            code(&project, "create-contact"),
            Invocation {
                handler: Handler::Action,
                host: Some(host.clone()),
                validation,
                ..invocation(input)
            },
        )
    };
    let effects = run(json!({"name": "ada"}), RecordValidation::Warn)
        .await
        .expect("it runs");
    assert_eq!(effects.output, Some(json!({"id": "200-ada"})));
    let calls = host.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 1);
    assert_eq!(
        (calls[0].0.as_str(), &calls[0].1["data"]),
        ("proxy", &json!({"name": "ada"}))
    );

    let nothing = run(json!({"name": "nothing"}), RecordValidation::Off).await.unwrap();
    assert_eq!(nothing.output, None);

    let refused = run(json!({"name": 5}), RecordValidation::Warn).await.unwrap_err();
    let thrown = refused.thrown.clone().expect("a typed error");
    assert_eq!(thrown.error_type, "invalid_action_input");
    assert_eq!(thrown.payload.unwrap()["issues"][0]["path"], json!(["name"]));
    assert!(
        refused
            .message
            .starts_with("ValidationError: the input does not match the action's input schema: name: "),
        "{refused}"
    );
    assert_eq!(host.calls.lock().unwrap().len(), 1, "refused input is not run");

    let failed = run(json!({"name": "refused"}), RecordValidation::Warn)
        .await
        .unwrap_err();
    let thrown = failed.thrown.expect("ActionError's");
    assert_eq!(thrown.error_type, "action_script_runtime_error");
    assert_eq!(
        thrown.payload,
        Some(json!({"message": "refused here", "name": "refused"}))
    );

    let upstream = run(json!({"name": "upstream"}), RecordValidation::Warn)
        .await
        .unwrap_err();
    let thrown = upstream.thrown.expect("the provider call's");
    assert_eq!(thrown.error_type, "script_http_error");
    assert_eq!(thrown.payload, Some(json!({"status": 500, "data": {"error": "boom"}})));

    // Output its schema refuses: a warning, or with "fail" a failure.
    let warned = run(json!({"name": "bad-output"}), RecordValidation::Warn)
        .await
        .unwrap();
    assert_eq!(warned.output, Some(json!({"id": 7})));
    assert!(
        warned.logs[0]
            .message
            .starts_with("the output does not match the action's output schema: id: "),
        "{:?}",
        warned.logs
    );
    let failed = run(json!({"name": "bad-output"}), RecordValidation::Fail)
        .await
        .unwrap_err();
    assert_eq!(failed.thrown.unwrap().error_type, "invalid_action_output");

    // An error without a type is only its message.
    let plain = run(json!({"name": "plain"}), RecordValidation::Warn).await.unwrap_err();
    assert_eq!((plain.kind, plain.thrown), (ErrorKind::Thrown, None));
    assert!(plain.message.starts_with("Error: plain"), "{}", plain.message);
}

/// Nango's `batchSend` (batchSave's older name) and `zodValidateInput`.
#[tokio::test]
async fn batch_send_saves_and_zod_validate_input_logs_then_throws() {
    let sync = "import { createSync } from 'nango';
import { z } from 'zod';
export default createSync({
  models: { Contact: {} },
  webhookSubscriptions: ['*'],
  onWebhook: async (nango, payload) => {
    await nango.batchSend([{ id: 'a' }], 'Contact');
    await nango.zodValidateInput({ zodSchema: z.object({ email: z.string() }), input: payload });
  },
});";
    let project = project(&[("crm/syncs/contacts.js", sync)]);
    let pool = Pool::new(1, limits());
    let failed = pool
        .execute(code(&project, "contacts"), invocation(json!({"email": 7})))
        .await
        .unwrap_err();
    assert!(
        failed.message.starts_with("ActionError: Invalid input provided"),
        "{failed}"
    );
    assert_eq!(failed.logs.len(), 1, "{:?}", failed.logs);
    assert_eq!(failed.logs[0].level, "error");
    assert!(
        failed.logs[0].message.starts_with("Invalid input: ") && failed.logs[0].message.ends_with(" at path email")
    );
    let effects = pool
        .execute(code(&project, "contacts"), invocation(json!({"email": "a@b.c"})))
        .await
        .expect("valid input passes");
    assert_eq!(effects.writes.len(), 1);
    assert_eq!(
        (effects.writes[0].kind, effects.writes[0].records[0].0.as_str()),
        (WriteKind::Save, "a")
    );
}

#[test]
fn index_js_chooses_the_syncs_and_an_object_export_is_a_sync_too() {
    let plain =
        "export default { type: 'sync', models: ['Contact'], webhookSubscriptions: ['*'], onWebhook: async () => {} };";
    let project = project(&[
        ("index.js", "import './crm/syncs/contacts.js';"),
        ("crm/syncs/contacts.js", plain),
        ("crm/syncs/draft.js", "export default {};"),
    ]);
    let names: Vec<&str> = project.syncs.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, vec!["contacts"], "draft.js is not imported by index.js");
    assert_eq!(project.syncs[0].config["models"], json!(["Contact"]));

    // The code hash covers what a sync loads, not its siblings.
    let a = self::project(&[("crm/syncs/a.js", plain), ("crm/syncs/b.js", plain)]);
    let b = self::project(&[
        ("crm/syncs/a.js", plain),
        ("crm/syncs/b.js", &format!("{plain}\n// changed")),
    ]);
    let hash = |p: &Project, name: &str| p.syncs.iter().find(|s| s.name == name).unwrap().code_hash.clone();
    assert_eq!(hash(&a, "a"), hash(&b, "a"));
    assert_ne!(hash(&a, "b"), hash(&b, "b"));
    assert_ne!(a.bundle.hash, b.bundle.hash);
}

#[tokio::test]
async fn math_random_differs_between_sandboxes_made_at_once() {
    let project = project(&[(
        "crm/syncs/r.js",
        &sync_with("await nango.batchSave([{id: String(Math.random())}], 'Contact');"),
    )]);
    let pool = Pool::new(4, limits());
    let runs = (0..8).map(|_| pool.execute(code(&project, "r"), invocation(json!({}))));
    let ids: std::collections::HashSet<String> = futures::future::join_all(runs)
        .await
        .into_iter()
        .map(|effects| effects.unwrap().writes[0].records[0].0.clone())
        .collect();
    assert_eq!(ids.len(), 8, "{ids:?}");
}

/// A host that answers the provider's API from pages and records every call.
#[derive(Default)]
struct FakeHost {
    calls: Mutex<Vec<(String, serde_json::Value)>>,
}

impl Host for FakeHost {
    fn call(&self, op: &str, args: &str, _time_left: Duration) -> Result<String, String> {
        let args: serde_json::Value = serde_json::from_str(args).map_err(|e| e.to_string())?;
        self.calls.lock().unwrap().push((op.to_string(), args.clone()));
        Ok(match op {
            "proxy" => {
                let cursor = args["params"]["cursor"].as_str().unwrap_or("");
                let page = match cursor {
                    "" => json!({"items": [{"id": 1}, {"id": 2}], "next": "p2"}),
                    "p2" => json!({"items": [{"id": 3}], "next": null}),
                    _ => return Err(format!("no page {cursor}")),
                };
                if args["endpoint"] == "/fail" {
                    json!({"status": 500, "headers": {}, "data": {"error": "boom"}}).to_string()
                } else {
                    json!({"status": 200, "headers": {}, "data": page}).to_string()
                }
            }
            "pagination" => "null".to_string(),
            "getRecordsByIds" => json!([{"id": "1", "email": "one@x"}]).to_string(),
            "getCheckpoint" => json!({"since": "yesterday"}).to_string(),
            "trackDeletesEnd" => "0".to_string(),
            _ => String::new(),
        })
    }
}

#[tokio::test]
async fn exec_calls_its_host_as_it_goes_and_paginates_by_cursor() {
    let sync = exec_sync(
        r#"
    const checkpoint = await nango.getCheckpoint();
    await nango.trackDeletesStart('Contact');
    for await (const page of nango.paginate({
      endpoint: '/contacts',
      paginate: { type: 'cursor', cursor_path_in_response: 'next', cursor_name_in_request: 'cursor', response_path: 'items' },
    })) {
      await nango.batchSave(page.map((c) => ({ id: String(c.id), since: checkpoint.since })), 'Contact');
    }
    await nango.trackDeletesEnd('Contact');
    await nango.saveCheckpoint({ since: 'today' });
    try {
      await nango.get({ endpoint: '/fail' });
    } catch (e) {
      await nango.log(`failed with ${e.status}`);
    }
"#,
    );
    let project = project(&[("crm/syncs/contacts.js", &sync)]);
    let pool = Pool::new(1, limits());
    let host = Arc::new(FakeHost::default());
    let effects = pool
        .execute(code(&project, "contacts"), exec_on(host.clone()))
        .await
        .expect("exec runs");
    assert!(effects.writes.is_empty(), "exec writes go to the host, not the effects");
    assert_eq!(effects.logs[0].message, "failed with 500");
    let calls = host.calls.lock().unwrap().clone();
    let ops: Vec<&str> = calls.iter().map(|(op, _)| op.as_str()).collect();
    assert_eq!(
        ops,
        [
            "getCheckpoint",
            "trackDeletesStart",
            "pagination",
            "proxy",
            "write",
            "proxy",
            "write",
            "trackDeletesEnd",
            "saveCheckpoint",
            "proxy"
        ]
    );
    let saved: Vec<&serde_json::Value> = calls.iter().filter(|(op, _)| op == "write").map(|(_, a)| a).collect();
    assert_eq!(
        saved[0]["records"],
        json!([{"id": "1", "since": "yesterday"}, {"id": "2", "since": "yesterday"}])
    );
    assert_eq!(saved[0]["strategy"], "ignore_if_modified_after");
    assert_eq!(saved[1]["records"], json!([{"id": "3", "since": "yesterday"}]));
    assert_eq!(calls[5].1["params"]["cursor"], "p2");

    // onWebhook reads the cache and calls the provider API through its host, and its
    // writes are still collected (committed with the event): a thin event is filled in
    // from the provider.
    let fetches = sync_with(
        "const cached = await nango.getRecordsByIds(['1'], 'Contact');
         const contact = await nango.get({ endpoint: `/contacts/${payload.objectId}` });
         const before = cached.get('1')?.email ?? null;
         await nango.batchSave(contact.data.items.map((c) => ({ ...c, before })), 'Contact');",
    );
    let project = self::project(&[("crm/syncs/hook.js", &fetches)]);
    let host = Arc::new(FakeHost::default());
    let effects = pool
        .execute(
            code(&project, "hook"),
            Invocation {
                host: Some(host.clone()),
                ..invocation(json!({"objectId": 1}))
            },
        )
        .await
        .expect("onWebhook fetches");
    assert_eq!(effects.writes[0].records.len(), 2, "{:?}", effects.writes);
    assert_eq!(effects.writes[0].records[0].1["before"], "one@x");
    let calls = host.calls.lock().unwrap().clone();
    let ops: Vec<&str> = calls.iter().map(|(op, _)| op.as_str()).collect();
    assert_eq!(ops, ["getRecordsByIds", "proxy"]);
    assert_eq!(calls[1].1["endpoint"], "/contacts/1");
    // Checkpoints, delete tracking, actions, syncs and locks stay exec's, and a read of a
    // model not the sync's is refused.
    for (call, refused) in [
        ("getRecordsByIds(['a'], 'Nope')", "is not one of this sync's models"),
        ("getCheckpoint()", "only available in exec, not in onWebhook"),
        (
            "trackDeletesStart('Contact')",
            "only available in exec, not in onWebhook",
        ),
        (
            "triggerAction('crm', 'c', 'a', {})",
            "only available in exec, not in onWebhook",
        ),
        (
            "tryAcquireLock({ key: 'k', ttlMs: 10 })",
            "only available in exec, not in onWebhook",
        ),
    ] {
        let webhook_only = sync_with(&format!("await nango.{call};"));
        let project = self::project(&[("crm/syncs/hook.js", &webhook_only)]);
        let error = pool
            .execute(
                code(&project, "hook"),
                Invocation {
                    host: Some(host.clone()),
                    ..invocation(json!({}))
                },
            )
            .await
            .expect_err("exec's alone");
        assert!(error.message.contains(refused), "{call}: {}", error.message);
    }
    assert_eq!(host.calls.lock().unwrap().len(), 2, "none of them reached the host");
    // The environment's variables are onWebhook's too, as the worker gives them.
    let reads = sync_with(
        "const vars = await nango.getEnvironmentVariables();
         await nango.batchSave([{ id: 'v', team: vars.find((v) => v.name === 'TEAM_ID').value }], 'Contact');",
    );
    let project = self::project(&[("crm/syncs/vars.js", &reads)]);
    let effects = pool
        .execute(code(&project, "vars"), invocation(json!({})))
        .await
        .unwrap();
    assert_eq!(effects.writes[0].records[0].1["team"], "team-1");
    // In exec, getRecordsByIds checks its arguments before asking the host.
    for (call, expected) in [
        (
            "getRecordsByIds('a', 'Contact')",
            "getRecordsByIds: the ids must be an array",
        ),
        (
            "getRecordsByIds(['a'], 'Deal')",
            "getRecordsByIds: model \"Deal\" is not one of this sync's models",
        ),
    ] {
        let project = self::project(&[("crm/syncs/reads.js", &exec_sync(&format!("await nango.{call};")))]);
        let error = pool
            .execute(code(&project, "reads"), exec_on(Arc::new(FakeHost::default())))
            .await
            .expect_err("bad arguments");
        assert!(error.message.contains(expected), "{call}: {}", error.message);
    }
}

/// A loaded sync keeps its module-level state between executions, as a module does;
/// the same code deployed to two environments is loaded once for each, so one never
/// sees what the other kept.
#[tokio::test]
async fn identical_code_in_two_environments_shares_no_state() {
    use hookyard_core::store::functions::DeployedSync;
    let project = project(&[(
        "crm/syncs/keeps.js",
        &sync_with(
            "globalThis.seen = (globalThis.seen ?? []).concat([payload.n]); await nango.log(JSON.stringify(globalThis.seen));",
        ),
    )]);
    let entry = &project.syncs[0].entry;
    let deployed = |environment: &str| {
        let sync = DeployedSync {
            id: 1,
            environment_id: 1,
            environment: environment.parse().unwrap(),
            integration: "crm".parse().unwrap(),
            name: "keeps".into(),
            version: 1,
            bundle_hash: project.bundle.hash.clone(),
            entry: entry.clone(),
            code_hash: String::new(),
            config: json!({}),
            deployed_at: chrono::Utc::now(),
        };
        Arc::new(SyncCode::of(&sync, Arc::new(project.bundle.modules.clone())))
    };
    let (dev, prod) = (deployed("dev"), deployed("prod"));
    let pool = Pool::new(1, limits());
    let seen = |code: &Arc<SyncCode>, n: u32| {
        let run = pool.execute(code.clone(), invocation(json!({"n": n})));
        async move { run.await.expect("it runs").logs[0].message.clone() }
    };
    assert_eq!(seen(&dev, 1).await, "[1]");
    assert_eq!(seen(&dev, 2).await, "[1,2]");
    assert_eq!(seen(&prod, 3).await, "[3]", "prod does not see dev's state");
    assert_eq!(seen(&dev, 4).await, "[1,2,4]");
}

/// A host that keeps the time left each call was given.
#[derive(Default)]
struct ClockHost(Mutex<Vec<Duration>>);

impl Host for ClockHost {
    fn call(&self, _op: &str, _args: &str, time_left: Duration) -> Result<String, String> {
        self.0.lock().unwrap().push(time_left);
        Ok(String::new())
    }
}

/// Each host call is told how long the run has left (a call must not wait past it:
/// QuickJS stops only code it runs), less as the run goes on.
#[tokio::test]
async fn a_host_call_is_given_the_time_the_run_has_left() {
    let sync = exec_sync(
        "await nango.getCheckpoint();
         await new Promise((resolve) => setTimeout(resolve, 50));
         await nango.getCheckpoint();",
    );
    let project = project(&[("crm/syncs/clock.js", &sync)]);
    let host = Arc::new(ClockHost::default());
    Pool::new(1, limits())
        .execute(code(&project, "clock"), exec_on(host.clone()))
        .await
        .expect("exec runs");
    let seen = host.0.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(
        seen[0] <= limits().timeout && seen[0] > limits().timeout / 2,
        "{seen:?}"
    );
    assert!(seen[1] + Duration::from_millis(50) <= seen[0], "{seen:?}");
}

struct PanickingHost;

impl Host for PanickingHost {
    fn call(&self, op: &str, _args: &str, _time_left: Duration) -> Result<String, String> {
        panic!("{op}: the async runtime is gone");
    }
}

/// A host call that panics (the worker's async runtime shutting down under an exec run)
/// fails the run with a message; it does not unwind into the engine, which aborts the
/// process, and the pool goes on.
#[tokio::test]
async fn a_host_that_panics_fails_the_run_not_the_process() {
    let sync = exec_sync(
        r#"
    try {
      await nango.getCheckpoint();
    } catch (e) {
      await nango.log(`first: ${e.message}`);
    }
    await nango.saveCheckpoint({ since: 'today' });
"#,
    );
    let project = project(&[("crm/syncs/contacts.js", &sync)]);
    let pool = Pool::new(1, limits());
    let run = || pool.execute(code(&project, "contacts"), exec_on(Arc::new(PanickingHost)));
    for _ in 0..2 {
        let error = run().await.expect_err("the host fails");
        assert_eq!(error.kind, ErrorKind::Thrown, "{error}");
        assert!(
            error
                .message
                .starts_with("Error: saveCheckpoint: the host failed; the service may be stopping"),
            "{error}"
        );
        assert_eq!(
            error.logs[0].message,
            "first: getCheckpoint: the host failed; the service may be stopping"
        );
    }
}

/// A plain pool runs a sync on every thread, slow or not (exec runs are all long); a
/// shared one runs a sync not known to be quick on all threads but one.
#[tokio::test]
async fn a_shared_pool_holds_a_slow_sync_to_all_threads_but_one() {
    let project = project(&[(
        "crm/syncs/waits.js",
        &sync_with("await new Promise((done) => setTimeout(done, 1000));"),
    )]);
    let two_runs = |pool: &Pool| {
        let runs = (0..2)
            .map(|_| (code(&project, "waits"), invocation(json!({}))))
            .collect();
        let started = Instant::now();
        let batch = pool.submit(runs);
        async move {
            batch.wait(None).await;
            assert!(batch.take_ended().iter().all(|(_, outcome)| outcome.is_ok()));
            started.elapsed()
        }
    };
    let together = two_runs(&Pool::new(2, limits())).await;
    assert!(together < Duration::from_millis(1800), "side by side: {together:?}");
    let shared = Pool::sized(
        Sizing {
            turns: 2,
            runs: 2,
            hold_back_slow: true,
        },
        limits(),
    );
    let one_by_one = two_runs(&shared).await;
    assert!(
        one_by_one >= Duration::from_secs(2),
        "one after the other: {one_by_one:?}"
    );
}

/// A host whose calls each wait (up to the run's time left) until `together` of them are
/// in flight at once, and which keeps the most it saw and the order the calls came in.
struct GatheringHost {
    together: usize,
    seen: Mutex<Gathered>,
    changed: std::sync::Condvar,
}

#[derive(Default)]
struct Gathered {
    in_flight: usize,
    most: usize,
    args: Vec<String>,
}

impl GatheringHost {
    fn new(together: usize) -> Arc<GatheringHost> {
        Arc::new(GatheringHost {
            together,
            seen: Mutex::default(),
            changed: std::sync::Condvar::new(),
        })
    }
}

impl Host for GatheringHost {
    fn call(&self, _op: &str, args: &str, time_left: Duration) -> Result<String, String> {
        let mut seen = self.seen.lock().unwrap();
        seen.in_flight += 1;
        seen.most = seen.most.max(seen.in_flight);
        seen.args.push(args.to_string());
        self.changed.notify_all();
        let (mut seen, _) = self
            .changed
            .wait_timeout_while(seen, time_left, |seen| seen.most < self.together)
            .unwrap();
        seen.in_flight -= 1;
        Ok(String::new())
    }
}

fn waiting_pool(turns: usize, runs: usize) -> Pool {
    Pool::sized(
        Sizing {
            turns,
            runs,
            hold_back_slow: false,
        },
        limits(),
    )
}

/// A run waiting on its host leaves its turn to run JavaScript to another: with one turn
/// and four threads, four runs wait on their provider at once (a pool whose runs kept
/// their turn through their waits would make them one at a time, each waiting in vain).
#[tokio::test]
async fn runs_waiting_on_their_host_leave_their_turn_to_others() {
    let project = project(&[("crm/syncs/fetch.js", &exec_sync("await nango.saveCheckpoint({});"))]);
    let host = GatheringHost::new(4);
    let runs = (0..4)
        .map(|_| (code(&project, "fetch"), exec_on(host.clone())))
        .collect();
    let batch = waiting_pool(1, 4).submit(runs);
    batch.wait(None).await;
    let outcomes = batch.take_ended();
    assert_eq!(outcomes.len(), 4);
    assert!(outcomes.iter().all(|(_, outcome)| outcome.is_ok()), "{outcomes:?}");
    assert_eq!(host.seen.lock().unwrap().most, 4, "four calls in flight at once");

    // Kept through the wait (threads no more than turns), one call at a time.
    let host = GatheringHost::new(2);
    let runs = (0..2)
        .map(|_| (code(&project, "fetch"), exec_on(host.clone())))
        .collect();
    let batch = Pool::new(1, limits()).submit(runs);
    batch.wait(None).await;
    assert_eq!(host.seen.lock().unwrap().most, 1);
}

/// So does a run waiting for a timer: the second run's call comes while the first sleeps.
#[tokio::test]
async fn a_run_waiting_for_a_timer_leaves_its_turn_to_another() {
    let project = project(&[(
        "crm/syncs/sleeps.js",
        &exec_sync(
            "if (nango.connectionId === 'sleeper') await new Promise((done) => setTimeout(done, 500));
             await nango.saveCheckpoint({ who: nango.connectionId });",
        ),
    )]);
    let host = GatheringHost::new(1);
    let run = |who: &str| {
        let mut invocation = exec_on(host.clone());
        invocation.connection_id = who.into();
        (code(&project, "sleeps"), invocation)
    };
    let batch = waiting_pool(1, 2).submit(vec![run("sleeper"), run("caller")]);
    batch.wait(None).await;
    assert!(batch.take_ended().iter().all(|(_, outcome)| outcome.is_ok()));
    let args = host.seen.lock().unwrap().args.clone();
    let checkpoints: Vec<&String> = args.iter().filter(|a| a.contains("who")).collect();
    assert_eq!(checkpoints.len(), 2, "{args:?}");
    assert!(
        checkpoints[0].contains("caller"),
        "the sleeper's timer held no turn: {args:?}"
    );
}

/// Running out of memory is reported as such, whatever the limit: QuickJS crashed the
/// process building the error's backtrace at some limits (engine 0.8), and at others
/// threw `null` for want of memory to make an error.
#[tokio::test]
async fn running_out_of_memory_is_reported_at_every_limit() {
    let project = project(&[
        (
            "crm/syncs/allocates_strings.js",
            &sync_with("const a = []; while (true) a.push('x'.repeat(1000));"),
        ),
        (
            "crm/syncs/throws_null.js",
            &sync_with("await nango.batchSave([{id: 'x'}], 'Contact'); throw null;"),
        ),
    ]);
    for mib in 4..=40 {
        let pool = Pool::new(
            1,
            Limits {
                memory_bytes: mib * 1024 * 1024,
                cpu_budget: Duration::from_secs(5),
                ..limits()
            },
        );
        let error = pool
            .execute(code(&project, "allocates_strings"), invocation(json!({})))
            .await
            .expect_err("it cannot succeed");
        assert_eq!(error.kind, ErrorKind::OutOfMemory, "at {mib} MiB: {error}");
        // A function's own `throw null` is not taken for running out of memory.
        let error = pool
            .execute(code(&project, "throws_null"), invocation(json!({})))
            .await
            .expect_err("it throws");
        assert_eq!(error.kind, ErrorKind::Thrown, "at {mib} MiB: {error}");
        assert_eq!(error.message, "thrown value: null");
    }
}

/// URL, URLSearchParams, Buffer, the text codecs, atob/btoa and the `crypto`, `url` and
/// `buffer` modules answer as Node.js's own do (Nango's runtime is Node.js): the cases
/// in node_parity/cases.js run in both, and every answer must match.
#[tokio::test]
async fn node_globals_and_modules_answer_as_node_does() {
    const CASES: &str = include_str!("node_parity/cases.js");
    let node = {
        use std::io::Write;
        let mut child = std::process::Command::new("node")
            .args(["--no-deprecation", "--input-type=module"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("Node.js (`node` on PATH) is this test's reference");
        let script = format!("{CASES}\nprocess.stdout.write(JSON.stringify(cases()));");
        child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "node failed on the cases");
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };

    let sync = "import { createSync } from 'nango';
import { cases } from '../cases.js';
export default createSync({
  models: { Result: {} },
  webhookSubscriptions: ['*'],
  onWebhook: async (nango) => { await nango.batchSave([{ id: 'cases', cases: cases() }], 'Result'); },
});";
    let project = project(&[("parity/cases.js", CASES), ("parity/syncs/parity.js", sync)]);
    let pool = Pool::new(1, limits());
    let mut run = invocation(json!({}));
    run.models = json!(["Result"]).to_string().into();
    let effects = pool.execute(code(&project, "parity"), run).await.unwrap();
    let ours = &effects.writes[0].records[0].1["cases"];

    let mut differences = Vec::new();
    differ("cases", ours, &node, &mut differences);
    assert!(
        differences.is_empty(),
        "{} answers differ from Node.js's:\n{}",
        differences.len(),
        differences.join("\n")
    );
}

/// The Node.js modules import by either name in each form, from TypeScript too; what
/// Node.js 20 (the parity reference) lacks is checked here; bytes are the sandbox's memory.
#[tokio::test]
async fn node_modules_import_by_either_name_and_bytes_count_against_the_memory_limit() {
    let sync = "import { createSync } from 'nango';
import { createHash, hash } from 'crypto';
import * as nodeCrypto from 'node:crypto';
import buffer, { Buffer as B } from 'node:buffer';
import { URL as U } from 'node:url';

export default createSync({
  models: { Contact: {} },
  webhookSubscriptions: ['*'],
  onWebhook: async (nango, payload: { size: number }) => {
    const same: boolean[] = [nodeCrypto.createHash === createHash, buffer.Buffer === B, B === Buffer, U === URL];
    if (same.includes(false)) throw new Error(`not the same: ${same}`);
    const checks = [
      hash('sha256', 'x') === createHash('sha256').update('x').digest('hex'),
      hash('md5', 'x', 'base64') === createHash('md5').update('x').digest('base64'),
      URL.parse('nope') === null,
      URL.parse('b', 'https://a.com/')?.href === 'https://a.com/b',
    ];
    if (checks.includes(false)) throw new Error(`checks: ${checks}`);
    await nango.batchSave([{ id: 'big', length: Buffer.alloc(payload.size).length }], 'Contact');
  },
});";
    let project = project(&[("crm/syncs/contacts.ts", sync)]);
    let pool = Pool::new(1, limits());
    let run = |size: u64| pool.execute(code(&project, "contacts"), invocation(json!({ "size": size })));
    let effects = run(1024 * 1024).await.unwrap();
    assert_eq!(effects.writes[0].records[0].1["length"], json!(1024 * 1024));
    // 64 MiB of Buffer against a 16 MiB limit: refused as memory, the pool goes on.
    let error = run(64 * 1024 * 1024).await.unwrap_err();
    assert_eq!(error.kind, ErrorKind::OutOfMemory, "{error}");
    run(16).await.unwrap();

    // The globals are set up when first read; one a function sets before that is its own.
    let own = "globalThis.URL = 'mine';
export default { webhookSubscriptions: ['*'], onWebhook: async (nango) => {
  if (Buffer.from('aGk=', 'base64').toString() !== 'hi' || URL !== 'mine') throw new Error(`URL ${URL}`);
  await nango.batchSave([{ id: 'own' }], 'Contact');
} };";
    let project = self::project(&[("crm/syncs/own.js", own)]);
    let effects = pool
        .execute(code(&project, "own"), invocation(json!({})))
        .await
        .unwrap();
    assert_eq!(effects.writes[0].records[0].0, "own");
}

/// Where `ours` and `theirs` differ, by path.
fn differ(path: &str, ours: &serde_json::Value, theirs: &serde_json::Value, out: &mut Vec<String>) {
    use serde_json::Value;
    match (ours, theirs) {
        (Value::Object(a), Value::Object(b)) => {
            for key in a.keys().chain(b.keys().filter(|k| !a.contains_key(*k))) {
                let none = Value::Null;
                differ(
                    &format!("{path}.{key}"),
                    a.get(key).unwrap_or(&none),
                    b.get(key).unwrap_or(&none),
                    out,
                );
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                differ(&format!("{path}[{i}]"), x, y, out);
            }
        }
        _ if ours != theirs => out.push(format!("{path}: hookyard {ours}, Node.js {theirs}")),
        _ => {}
    }
}
