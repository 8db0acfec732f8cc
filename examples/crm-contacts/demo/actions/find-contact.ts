// An action: `POST /action/trigger` runs it for a connection, with an input, and answers
// with what it returns. This one looks a contact up by email through the CRM's API.
import { createAction } from 'nango';
import * as z from 'zod';
import { Contact, toContact, type CrmContact } from '../models.js';

export default createAction({
  description: 'The contact with this email, read from the CRM',
  version: '1.0.0',
  // Input it refuses is answered 400, and the action does not run.
  input: z.object({ email: z.string() }),
  output: Contact,

  exec: async (nango, input: { email: string }) => {
    for await (const page of nango.paginate<CrmContact>({ endpoint: '/contacts' })) {
      const found = page.find((contact) => contact.email === input.email);
      if (found) return toContact(found);
    }
    // The caller gets this payload with a 500 `action_script_runtime_error`.
    throw new nango.ActionError({ message: 'no contact has this email', email: input.email });
  },
});
